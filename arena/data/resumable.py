"""A training loader that an interrupted run resumes exactly: the same batches, in the same order.

The shuffle is a function of a seed and the epoch alone (not of the global random state), and the
loader is a Lightning *stateful* loader: its state (seed, epoch, how far the epoch got) is saved in
every checkpoint and loaded before the resumed epoch's iterator is made, which then starts after the
samples already trained on. Under DDP each process reads its shard of that one order (the loader
shards itself, so the trainer runs with ``use_distributed_sampler=False``): the samples trained on
are always a prefix of the epoch's order, which a run resumed on another number of processes
continues from. With loader workers, and under DDP, each sample's random draws (augmentations) come
from generators seeded by the seed, the epoch and the sample's index: a worker's generators would
otherwise depend on which samples it loaded before, which differs when an epoch restarts midway, and
on the number of workers; and DDP's processes, seeded alike, would draw alike.
"""
from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info


class EpochSampler(Sampler):
    """A random order drawn from ``seed + epoch`` (Lightning calls ``set_epoch`` every epoch), of which
    process ``rank`` of ``num_replicas`` takes every ``num_replicas``-th sample; the next pass starts at
    position ``start`` of the order. As torch's ``DistributedSampler``, the order is padded with its first
    samples so that every process gets as many. ``seeded``: yield ``(index, seed, epoch)`` for
    ``SeededSamples``."""

    def __init__(self, size: int, *, seed: int, seeded: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas) with num_replicas >= 1, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        self.size, self.seed, self.epoch, self.start, self.seeded = size, seed, 0, 0, seeded
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        return self.pass_length(0)

    def pass_length(self, start: int) -> int:
        """How many samples this process gets in a pass that starts at position ``start``."""
        return math.ceil(max(self.size - start, 0) / self.num_replicas)

    def shard(self, start: int) -> list[int]:
        """This process's samples of the epoch's order from position ``start`` on."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        rest = order[start:]
        pad = -len(rest) % self.num_replicas
        rest += (order * (pad // max(self.size, 1) + 1))[:pad]
        return rest[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int | tuple[int, int, int]]:
        start, self.start = self.start, 0
        indices = self.shard(start)
        if not self.seeded:
            return iter(indices)
        return ((i, self.seed, self.epoch) for i in indices)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` of a run whose loader seed is ``seed``."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(index, seed, epoch)``: torch's CPU, NumPy's and Python's global generators
    are seeded from all three before the item is made (about 30 us). In a loader worker the generators
    are the worker's own; in the main process their states are put back after the item (about 0.1 ms),
    so the training's own draws (dropout) go on as they would have."""

    def __init__(self, dataset: Sized) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        index, seed, epoch = key
        if get_worker_info() is not None:
            _seed_generators(_sample_seed(seed, epoch, index))
            return self.dataset[index]
        states = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
        try:
            _seed_generators(_sample_seed(seed, epoch, index))
            return self.dataset[index]
        finally:
            torch.default_generator.set_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])


def _seed_generators(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every accelerator: 0.2 ms
    random.seed(seed)
    np.random.seed(seed % 2**32)


def draw_seed() -> int:
    """A loader seed from torch's global generator, so that it follows ``seed_everything``."""
    return int(torch.empty((), dtype=torch.int64).random_().item()) % 2**62


class ResumableLoader(DataLoader):
    """A shuffling ``DataLoader`` over ``EpochSampler`` with ``state_dict``/``load_state_dict``.

    ``seed`` (by default ``draw_seed()``; under DDP every process must pass the same) then travels in
    the checkpoint. The loader's own generator seeds the workers, so making an iterator draws nothing
    from the global generator, whose state a resumed run restores. With ``num_workers=0`` on one process
    the samples draw from that global generator (restored at resume); with workers, or under DDP (whose
    processes would otherwise draw alike: the same scenes, the same flips), from generators seeded per
    sample (``SeededSamples``), so the batches are the same for any number of workers.
    """

    def __init__(self, dataset: Sized, *, seed: int | None = None, num_replicas: int = 1, rank: int = 0,
                 **kwargs: Any) -> None:
        seed = draw_seed() if seed is None else seed
        # per-sample draws with workers, and under DDP, whose processes' global generators are seeded alike
        seeded = kwargs.get("num_workers", 0) > 0 or num_replicas > 1
        super().__init__(SeededSamples(dataset) if seeded else dataset,
                         sampler=EpochSampler(len(dataset), seed=seed, seeded=seeded, num_replicas=num_replicas,
                                              rank=rank),
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self.first, self.served = 0, 0  # this pass: where in the order it started, batches served so far

    def _batches(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        self.first, self.served = self.sampler.start, 0
        for batch in super().__iter__():
            self.served += 1  # counted before the step runs: a checkpoint taken in it skips this batch
            yield batch

    def state_dict(self) -> dict[str, int | bool]:
        """``done``: the samples of the epoch's order trained on (by every process), a prefix of it."""
        done = self.first + self.served * self.batch_size * self.sampler.num_replicas
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "done": done,
                "finished": self.served >= self._batches(self.sampler.pass_length(self.first))}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        if "served" in state:  # written before the loader sharded itself: by one process, batches served
            served = state["served"]
            finished = served >= self._batches(self.sampler.size)
            state = {**state, "done": served * self.batch_size, "finished": finished}
        self.sampler.seed = state["seed"]
        self.sampler.epoch = state["epoch"] + 1 if state["finished"] else state["epoch"]
        self.sampler.start = 0 if state["finished"] else state["done"]
