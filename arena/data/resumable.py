"""A training loader that an interrupted run resumes exactly: the same batches, in the same order.

The shuffle is a function of a seed and the epoch alone (not of the global random state), and the
loader is a Lightning *stateful* loader: its state (seed, epoch, batches served) is saved in every
checkpoint and loaded before the resumed epoch's iterator is made, which then starts after the
batches already trained on.
"""
from __future__ import annotations

from typing import Any, Iterator, Sized

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """A random order drawn from ``seed + epoch`` (Lightning calls ``set_epoch`` every epoch); the next
    pass starts at sample ``start``."""

    def __init__(self, size: int, *, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start, self.start = self.start, 0
        return iter(order[start:].tolist())


class ResumableLoader(DataLoader):
    """A shuffling ``DataLoader`` over ``EpochSampler`` with ``state_dict``/``load_state_dict``.

    The seed is drawn from torch's global generator when the loader is made (so it follows
    ``seed_everything``) and then travels in the checkpoint. The loader's own generator seeds the
    workers, so making an iterator draws nothing from the global generator, whose state a resumed
    run restores.
    """

    def __init__(self, dataset: Sized, **kwargs: Any) -> None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item()) % 2**62
        super().__init__(dataset, sampler=EpochSampler(len(dataset), seed=seed),
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self.served = 0  # batches of the sampler's current epoch handed out so far

    def __iter__(self) -> Iterator[Any]:
        self.served = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self.served += 1  # counted before the step runs: a checkpoint taken in it skips this batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        finished = state["served"] >= len(self)
        self.sampler.seed = state["seed"]
        self.sampler.epoch = state["epoch"] + 1 if finished else state["epoch"]
        self.sampler.start = 0 if finished else state["served"] * self.batch_size
