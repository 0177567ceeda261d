"""What the on-disk detection formats share: box- and mask-aware augmentation, sample checks, the datamodule base.

A detection sample is ``(image, target)``: a ``[3, H, W]`` float image in ``[0, 1]`` (torchvision's
detectors normalise it with the backbone's mean and std themselves) and a target with ``boxes``
(``[N, 4]`` float, absolute xyxy pixels), ``labels`` (``1..K``, 0 is the background), ``iscrowd``
(objects the metric ignores: COCO crowds, VOC ``difficult``) and, where the data has them,
``masks`` (``[N, H, W]`` uint8). Images without objects are valid (``N = 0``).

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

from .base import ArenaDataModule, detection_collate

DEFAULT_SCALES = (0.75, 0.875, 1.0)


def degenerate(boxes: torch.Tensor) -> torch.Tensor:
    """Which xyxy boxes have zero or negative width or height."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def warn_degenerate(count: int, total: int, source: str, examples: Sequence[str]) -> None:
    """One warning per dataset for the boxes it dropped, naming where some of them are."""
    if count:
        warnings.warn(f"{source}: dropped {count} of {total} boxes with zero or negative width or height "
                      f"(in {', '.join(list(examples)[:5])})", stacklevel=3)


def read_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB; ``FileNotFoundError``/``ValueError`` name a missing or unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}. Remove or replace the file.") from e


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
    steps: list[v2.Transform] = []
    if train:
        steps.append(v2.RandomChoice([v2.Resize(size=None, max_size=round(image_size * s)) for s in scales]))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd), v2.ToDtype(torch.float32, scale=True),
              v2.ToPureTensor()]
    return v2.Compose(steps)


class DetectionDataset(Dataset):
    """Base of the on-disk formats: subclasses list images in ``__len__`` and read one in ``load``."""

    def __init__(self, transforms: Callable[..., Any]) -> None:
        self.transforms = transforms

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


__all__ = ["DetectionDataModule", "DetectionDataset", "detection_transforms", "to_tv", "degenerate",
           "warn_degenerate", "read_image", "check_sizes", "DEFAULT_SCALES"]
