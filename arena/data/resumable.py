"""A training loader that an interrupted run resumes exactly: the same batches, in the same order.

The shuffle is a function of a seed and the epoch alone (not of the global random state), and the
loader is a Lightning *stateful* loader: its state (seed, epoch, batches served) is saved in every
checkpoint and loaded before the resumed epoch's iterator is made, which then starts after the
batches already trained on. With loader workers, each sample's random draws (augmentations) come
from generators seeded by the seed, the epoch and the sample's index: a worker's generators would
otherwise depend on which samples it loaded before, which differs when an epoch restarts midway,
and on the number of workers.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler):
    """A random order drawn from ``seed + epoch`` (Lightning calls ``set_epoch`` every epoch); the next
    pass starts at sample ``start``. ``seeded``: yield ``(index, seed, epoch)`` for ``SeededSamples``."""

    def __init__(self, size: int, *, seed: int, seeded: bool = False) -> None:
        self.size, self.seed, self.epoch, self.start, self.seeded = size, seed, 0, 0, seeded

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int | tuple[int, int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start, self.start = self.start, 0
        indices = order[start:].tolist()
        if not self.seeded:
            return iter(indices)
        return ((i, self.seed, self.epoch) for i in indices)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` of a run whose loader seed is ``seed``."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(index, seed, epoch)``: torch's CPU, NumPy's and Python's global generators
    are seeded from all three before the item is made (about 30 us). Meant for loader workers, whose
    generators are their own."""

    def __init__(self, dataset: Sized) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        index, seed, epoch = key
        seed = _sample_seed(seed, epoch, index)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every accelerator: 0.2 ms
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


class ResumableLoader(DataLoader):
    """A shuffling ``DataLoader`` over ``EpochSampler`` with ``state_dict``/``load_state_dict``.

    The seed is drawn from torch's global generator when the loader is made (so it follows
    ``seed_everything``) and then travels in the checkpoint. The loader's own generator seeds the
    workers, so making an iterator draws nothing from the global generator, whose state a resumed
    run restores. With ``num_workers=0`` the samples draw from that global generator (restored at
    resume); with workers, from generators seeded per sample (``SeededSamples``), so the batches are
    the same for any number of workers.
    """

    def __init__(self, dataset: Sized, **kwargs: Any) -> None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item()) % 2**62
        workers = kwargs.get("num_workers", 0) > 0
        super().__init__(SeededSamples(dataset) if workers else dataset,
                         sampler=EpochSampler(len(dataset), seed=seed, seeded=workers),
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
