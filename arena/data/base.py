"""What every datamodule shares: the task it serves, normalisation, loaders.

Datamodules are built by ``train.py`` as ``instantiate(cfg.data, task=..., data_config=...)``,
where ``data_config`` is timm's resolved preprocessing of the backbone (mean, std, input size,
interpolation, crop) so real data is fed the way the backbone expects.
"""
from __future__ import annotations

import functools
import math
import os
import re
import signal
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from backbones._features import IMAGENET_MEAN, IMAGENET_STD

from .checks import DataCheck
from .resumable import ResumableLoader, draw_seed

SPLITS = ("train", "val", "test")
NAME_RULE = "letters, digits and _ . + -, starting with a letter or digit"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def dataset_name(root: str) -> str:
    """A data root's folder name made path-safe: ``/data/hymenoptera/`` -> ``hymenoptera``.

    The folder formats' configs default to ``name: ${dataset_name:${.root}}``, so records, battle
    cells and leaderboard settings tell two datasets of one format apart.
    """
    folder = Path(os.path.abspath(os.path.expanduser(str(root)))).name
    name = _UNSAFE.sub("-", folder).strip(".-")
    if not name:
        raise ValueError(f"cannot make a dataset name from data.root={root!r}; set data.name=<name> ({NAME_RULE})")
    return name


def check_name(name: str) -> str:
    """``name`` when it can name records and directories (no path separators, no leading dot); else ``ValueError``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name)):
        safe = _UNSAFE.sub("-", str(name)).strip(".-") or "my_data"
        raise ValueError(f"data.name={name!r} cannot name records and run directories; use {NAME_RULE}, "
                         f"e.g. data.name={safe}")
    return str(name)


def normalize(image_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CHW uint8 -> float normalised with the backbone's mean/std."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image_uint8.float() / 255.0 - m) / s


def detection_collate(batch: list[tuple[torch.Tensor, Any]]) -> tuple[list[torch.Tensor], list[Any]]:
    """Detection batches stay lists: images and targets differ in size and count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class ArenaDataModule(L.LightningDataModule):
    """Base datamodule: subclasses set ``num_classes``, ``class_names`` and implement ``make_dataset``.

    ``test_splits`` are the test sets in dataloader order: ``test``, then extra ones with the same
    classes (``ood/<name>``); ``has_split`` says which further splits a probe can read with
    ``eval_loader`` (``bank``: the training split without augmentation; ``gallery``).
    """

    num_classes: int
    class_names: list[str]
    test_splits: list[str]
    checked_splits: tuple[str, ...] = SPLITS  # built and checked at setup

    def __init__(self, *, task: str, tasks: Sequence[str], batch_size: int = 64, num_workers: int = 0,
                 data_config: dict[str, Any] | None = None, name: str | None = None, verify: str = "header") -> None:
        super().__init__()
        if task not in tasks:
            raise ValueError(f"{type(self).__name__} serves the tasks {tuple(tasks)}, got task={task!r}; "
                             f"pick a data config made for {task}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = task
        self.batch_size, self.num_workers = batch_size, num_workers
        if isinstance(data_config, DictConfig):  # instantiate() hands keyword arguments over as config nodes
            data_config = OmegaConf.to_container(data_config, resolve=True)
        self.data_config = dict(data_config or {})
        self.mean = tuple(self.data_config.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.data_config.get("std", IMAGENET_STD))
        self.name = check_name(name) if name is not None else type(self).__name__
        self.data_check = DataCheck(verify=verify, workers=num_workers)
        self.checked = False
        self.datasets: dict[str, Dataset] = {}
        self.test_splits = ["test"]

    @property
    def image_size(self) -> tuple[int, int]:
        """The (H, W) the model sees, so a backbone can refuse it before anything runs."""
        _, h, w = self.data_config.get("input_size", (3, 224, 224))
        return (h, w)

    def make_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    @property
    def collate_fn(self) -> Callable | None:
        return None

    def check_data(self, check: DataCheck) -> None:
        """Add what is wrong with the files of ``self.datasets`` to ``check`` (generated data: nothing)."""

    def setup(self, stage: str | None = None) -> None:
        """Build every split and check its files, once, so bad data fails before any step runs (whatever ``stage``)."""
        if self.checked:
            return
        for split in self.checked_splits:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)
        self.check_data(self.data_check)
        self.data_check.raise_if_any(self.name)
        self.checked = True

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        if split not in self.datasets:  # a split outside checked_splits (OOD set, kNN bank), built when asked for
            self.datasets[split] = self.make_dataset(split)
        # Under DDP the loaders shard themselves (the trainer runs with use_distributed_sampler=False): the
        # training loader so that it resumes mid-epoch, the others as Lightning would (torch's DistributedSampler)
        trainer = self.trainer
        processes, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = self.datasets[split]
        kwargs = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn,
                      persistent_workers=self.num_workers > 0,
                      worker_init_fn=functools.partial(_init_worker, rank=rank) if self.num_workers > 0 else None,
                      drop_last=shuffle and self.task != "detection"
                      and math.ceil(len(dataset) / processes) > self.batch_size)
        if shuffle:
            seed = draw_seed() if processes == 1 else trainer.strategy.broadcast(draw_seed())  # one order for all
            return ResumableLoader(dataset, seed=seed, num_replicas=processes, rank=rank, **kwargs)
        sampler = DistributedSampler(dataset, processes, rank, shuffle=False) if processes > 1 else None
        # An iterator draws its workers' seed from ``generator``, torch's global one if None. Persistent workers
        # make theirs once per process, which a resumed process does at another step than the run it continues:
        # that draw would shift every later random draw of the training, so eval loaders bring their own.
        own = torch.Generator() if kwargs["persistent_workers"] else None
        return DataLoader(dataset, sampler=sampler, generator=own, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def has_split(self, split: str) -> bool:
        """Whether ``make_dataset`` serves ``split`` beyond train, val and the test sets."""
        return False

    def eval_loader(self, split: str) -> DataLoader:
        """``split`` in order, with test-time preprocessing."""
        return self._loader(split, shuffle=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self.eval_loader(s) for s in self.test_splits]
        return loaders[0] if len(loaders) == 1 else loaders


def _init_worker(worker_id: int, rank: int) -> None:
    """Leave Ctrl-C to the main process, which saves and exits; then seed as Lightning would.

    A terminal's Ctrl-C reaches the whole process group: a loader worker killed by it makes the
    main process fail with "DataLoader worker exited unexpectedly" instead of stopping cleanly.
    Lightning adds its seeding ``worker_init_fn`` only to loaders without one, so it is chained here.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id, rank=rank)
