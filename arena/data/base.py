"""What every datamodule shares: the task it serves, normalisation, loaders.

Datamodules are built by ``train.py`` as ``instantiate(cfg.data, task=..., data_config=...)``,
where ``data_config`` is timm's resolved preprocessing of the backbone (mean, std, input size,
interpolation, crop) so real data is fed the way the backbone expects.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from backbones._features import IMAGENET_MEAN, IMAGENET_STD


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

    def __init__(self, *, task: str, tasks: Sequence[str], batch_size: int = 64, num_workers: int = 0,
                 data_config: dict[str, Any] | None = None, name: str | None = None) -> None:
        super().__init__()
        if task not in tasks:
            raise ValueError(f"{type(self).__name__} serves the tasks {tuple(tasks)}, got task={task!r}; "
                             f"pick a data config made for {task}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = task
        self.batch_size, self.num_workers = batch_size, num_workers
        self.data_config = dict(data_config or {})
        self.mean = tuple(self.data_config.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.data_config.get("std", IMAGENET_STD))
        self.name = name or type(self).__name__
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

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: ("train", "val", "test")}
        for split in splits.get(stage, ("test",)):
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=self.collate_fn,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle and self.task != "detection"
                          and len(self.datasets[split]) > self.batch_size)

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
