"""What the on-disk detection formats share: box- and mask-aware augmentation, sample checks, the datamodule base.

A detection sample is ``(image, target)``: a ``[3, H, W]`` float image in ``[0, 1]`` (torchvision's
detectors normalise it with the backbone's mean and std themselves) and a target with ``boxes``
(``[N, 4]`` float, absolute xyxy pixels), ``labels`` (``1..K``, 0 is the background), ``iscrowd``
(objects the metric ignores: COCO crowds, VOC ``difficult``) and, where the data has them,
``masks`` (``[N, H, W]`` uint8). Images without objects are valid (``N = 0``).

Boxes reaching outside their image are clipped to it (a box wholly outside becomes empty and is
dropped); setup counts both in warnings, after checking every split's files together
(``arena.data.checks``): datasets collect what is wrong with their annotations in ``problems``.

Augmentation is ``torchvision.transforms.v2`` on ``tv_tensors``, so boxes and masks move with
the image. Training images get their longer side resized to ``image_size`` times a scale drawn
from ``scales`` (aspect kept: multi-scale training) and a random horizontal flip. Evaluation
images stay as they are: the detector resizes them to ``image_size`` and maps its boxes back, so
mAP is measured in the original pixels (COCO's protocol, including its small/medium/large areas).
Padding to the backbone's size divisibility happens when the detector batches the images.

>>> t = detection_transforms(train=True, image_size=32, scales=(1.0,))
>>> image, target = t(*to_tv(torch.zeros(3, 48, 64, dtype=torch.uint8),
...                          {"boxes": torch.tensor([[8.0, 8.0, 24.0, 16.0]]), "labels": torch.tensor([1])}))
>>> image.shape, image.dtype, target["boxes"].shape
(torch.Size([3, 24, 32]), torch.float32, torch.Size([1, 4]))
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from .base import SPLITS, ArenaDataModule, detection_collate
from .checks import DataCheck

DEFAULT_SCALES = (0.75, 0.875, 1.0)


def degenerate(boxes: torch.Tensor) -> torch.Tensor:
    """Which xyxy boxes have zero or negative width or height."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def warn_degenerate(count: int, total: int, source: str, examples: Sequence[str]) -> None:
    """One warning per dataset for the boxes it dropped, naming where some of them are."""
    if count:
        warnings.warn(f"{source}: dropped {count} of {total} boxes with zero or negative width or height "
                      f"(in {', '.join(list(examples)[:5])})", stacklevel=3)


def warn_outside(files: Sequence[tuple[Path, torch.Tensor, tuple[int, int] | None]],
                 sizes: dict[Path, tuple[int, int]], source: str) -> None:
    """Warn once for the xyxy boxes that reach outside their (W, H) image (clipped) or lie wholly outside (dropped).

    ``files`` holds (image, boxes, size from the annotations); the size read from the image wins.
    """
    clipped, total, where, dropped = 0, 0, [], []
    for path, boxes, annotated in files:
        size = sizes.get(path, annotated)
        if size is None or not len(boxes):
            continue
        w, h = size
        outside = (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
        partly = ~outside & ((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > w) | (boxes[:, 3] > h))
        total += len(boxes)
        if partly.any():
            clipped, where = clipped + int(partly.sum()), where + [path.name]
        if outside.any():
            dropped.append(f"{path.name} ({int(outside.sum())})")
    if clipped:
        warnings.warn(f"{source}: clipped {clipped} of {total} boxes that reach outside their image to its borders "
                      f"(in {', '.join(where[:5])}{', ...' if len(where) > 5 else ''})", stacklevel=2)
    if dropped:
        warnings.warn(f"{source}: dropped the boxes that lie wholly outside their image, in {', '.join(dropped)}",
                      stacklevel=2)


def read_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB (16-bit images keep their top 8 bits); ``FileNotFoundError``/``ValueError`` name a
    missing or unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}. Remove or replace the file.") from e
    return (image.to(torch.int32) >> 8).to(torch.uint8) if image.dtype == torch.uint16 else image


def to_tv(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """Wrap a uint8 image and its target as ``tv_tensors`` so v2 transforms move boxes and masks with it."""
    size = tuple(image.shape[-2:])
    out: dict[str, Any] = {
        "boxes": tv_tensors.BoundingBoxes(target["boxes"].float().reshape(-1, 4), format="XYXY", canvas_size=size),
        "labels": target["labels"].long(),
        "iscrowd": target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.bool)),
    }
    if "masks" in target:
        out["masks"] = tv_tensors.Mask(target["masks"].to(torch.uint8).reshape(-1, *size))
    return tv_tensors.Image(image), out


def _labels_and_crowd(sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
    target = sample[1]
    return target["labels"], target["iscrowd"]


def check_sizes(image_size: int, scales: Sequence[float]) -> None:
    """``ValueError`` for a longer side below 32 pixels or scale factors outside (0, 4]."""
    if image_size < 32:
        raise ValueError(f"image_size (the longer side) must be >= 32, got {image_size}")
    if not scales or any(not 0 < s <= 4 for s in scales):
        raise ValueError(f"scales must be a non-empty list of factors in (0, 4], got {list(scales)}")


def detection_transforms(*, train: bool, image_size: int, scales: Sequence[float] = DEFAULT_SCALES,
                         hflip: bool = True) -> v2.Compose:
    """The v2 pipeline of one split (see the module docstring); ends in plain tensors, image in ``[0, 1]``."""
    check_sizes(image_size, scales)
    steps: list[v2.Transform] = [v2.ClampBoundingBoxes()]
    if train:
        steps.append(v2.RandomChoice([v2.Resize(size=None, max_size=round(image_size * s)) for s in scales]))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd), v2.ToDtype(torch.float32, scale=True),
              v2.ToPureTensor()]
    return v2.Compose(steps)


class DetectionDataset(Dataset):
    """Base of the on-disk formats: subclasses list images in ``__len__``, read one in ``load``, give every
    image with its boxes in ``files`` and add what is wrong with the annotations to ``problems``."""

    def __init__(self, transforms: Callable[..., Any], source: str) -> None:
        self.transforms = transforms
        self.source = source
        self.problems: list[tuple[str, str, str]] = []  # (where, what is wrong, fix), reported at setup

    def files(self) -> list[tuple[Path, torch.Tensor, tuple[int, int] | None]]:
        """Every image with its xyxy boxes and the (W, H) its annotations give (``None`` when they give none)."""
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The uint8 image and its target (``boxes``, ``labels``, ``iscrowd``, maybe ``masks``)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.transforms(*to_tv(*self.load(index)))


class DetectionDataModule(ArenaDataModule):
    """Base of the on-disk detection datamodules.

    Subclasses set ``class_names`` (the K object classes; ``num_classes`` is K + 1 with the
    background), ``has_masks`` and implement ``make_dataset(split)`` with ``self.transforms(split)``.
    ``image_size`` is the longer image side the model sees.
    """

    has_masks: bool = False

    def __init__(self, *, task: str, image_size: int = 512, scales: Sequence[float] = DEFAULT_SCALES,
                 hflip: bool = True, **kwargs: Any) -> None:
        super().__init__(task=task, tasks=("detection",), **kwargs)
        self.scales, self.hflip = tuple(scales), hflip
        self.data_config["input_size"] = (3, image_size, image_size)
        check_sizes(image_size, self.scales)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1

    def transforms(self, split: str) -> v2.Compose:
        return detection_transforms(train=split == "train", image_size=self.image_size[0], scales=self.scales,
                                    hflip=self.hflip)

    @property
    def collate_fn(self) -> Callable:
        return detection_collate

    def check_data(self, check: DataCheck) -> None:
        """Annotation problems, every image, and one warning per source for boxes outside their image."""
        sources = {self.datasets[split].source: self.datasets[split] for split in SPLITS}
        for ds in sources.values():
            for problem in ds.problems:
                check.add(*problem)
            files = ds.files()
            warn_outside(files, check.images(path for path, _, _ in files), ds.source)


__all__ = ["DetectionDataModule", "DetectionDataset", "detection_transforms", "to_tv", "degenerate",
           "warn_degenerate", "warn_outside", "read_image", "check_sizes", "DEFAULT_SCALES"]
