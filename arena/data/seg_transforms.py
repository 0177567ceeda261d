"""Joint image/mask transforms for semantic segmentation, on ``torchvision.transforms.v2``.

Masks are ``tv_tensors.Mask``, so v2 resizes them with nearest interpolation, flips and crops
them with the image, and fills padding with the ignore index. Training follows mmsegmentation's
recipe: random rescale of a base size (``ScaleJitter``), random crop padded to the crop size,
horizontal flip; evaluation only normalises, so scores are computed at the masks' own resolution.

>>> from torchvision import tv_tensors
>>> t = train_transforms(crop_size=32, base_size=(48, 64), ignore_index=255, mean=(0.5,) * 3, std=(0.5,) * 3)
>>> image, mask = t(tv_tensors.Image(torch.zeros(3, 48, 64, dtype=torch.uint8)),
...                 tv_tensors.Mask(torch.zeros(48, 64, dtype=torch.int64)))
>>> image.shape, image.dtype, mask.shape, mask.dtype
(torch.Size([3, 32, 32]), torch.float32, torch.Size([32, 32]), torch.int64)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std))]


def train_transforms(*, crop_size: int | Sequence[int], base_size: Sequence[int],
                     scale_range: Sequence[float] = (0.5, 2.0), hflip: bool = True, ignore_index: int,
                     mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Random rescale of ``base_size`` (H, W) by ``scale_range``, random crop, flip, normalise.

    The image is resized to fit ``base_size * s`` keeping its aspect ratio, ``s`` drawn from
    ``scale_range``; crops larger than the rescaled image are padded (image 0, mask
    ``ignore_index``).
    """
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {list(scale_range)}")
    if len(base_size) != 2 or min(base_size) < 1:
        raise ValueError(f"base_size must be (height, width) in pixels, got {list(base_size)}")
    steps: list[v2.Transform] = [
        v2.ScaleJitter(target_size=tuple(base_size), scale_range=tuple(scale_range), antialias=True),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_float(mean, std))


def eval_transforms(*, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalisation only: evaluation sees each image and mask at its own size."""
    return v2.Compose(_to_float(mean, std))


class PadCollate:
    """Batch images and masks of different sizes: pad to the largest (image 0, mask ``ignore_index``).

    Padded pixels carry the ignore index, so they count in neither loss nor metrics.

    >>> collate = PadCollate(ignore_index=255)
    >>> x, y = collate([(torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.int64)),
    ...                 (torch.ones(3, 5, 3), torch.zeros(5, 3, dtype=torch.int64))])
    >>> x.shape, y.shape, int(y[0, 4, 0]), int(y[1, 0, 5])
    (torch.Size([2, 3, 5, 6]), torch.Size([2, 5, 6]), 255, 255)
    """

    def __init__(self, *, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        h = max(img.shape[-2] for img, _ in batch)
        w = max(img.shape[-1] for img, _ in batch)
        images, masks = [], []
        for img, mask in batch:
            pad = (0, w - img.shape[-1], 0, h - img.shape[-2])
            images.append(F.pad(img.as_subclass(torch.Tensor), pad, value=0.0))
            masks.append(F.pad(mask.as_subclass(torch.Tensor), pad, value=self.ignore_index))
        return torch.stack(images), torch.stack(masks)


__all__ = ["train_transforms", "eval_transforms", "PadCollate"]
