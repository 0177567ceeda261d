"""Semantic segmentation data on disk: image folders with index-mask folders, and Pascal VOC.

Two layouts, both giving ``(image, mask)`` pairs where a mask is a single-channel PNG whose
pixel values are class indices ``0..K-1`` and ``ignore_index`` marks void pixels:

- ``MaskFolderDataModule`` (CamVid, ADE20K style): per split, an image folder and a mask folder
  whose files share stems, e.g. ``root/train/*.png`` with ``root/trainannot/*.png``. Folder
  names per split, class names and the void value are configurable.
- ``VOCSegmentationDataModule`` (Pascal VOC): ``root/JPEGImages/<id>.jpg``,
  ``root/SegmentationClass/<id>.png`` (palette PNGs whose indices are the classes, 255 on object
  borders = void) and the ids of each split in ``root/ImageSets/Segmentation/<split>.txt``.

``mask_values`` maps stored values to class indices (values it does not name are kept), e.g.
``{0: 0, 255: 1}`` for two-class masks stored as 0/255, where 255 would otherwise be void.

Bad data fails with the file named: an image without a mask (when the split is listed); and, at
setup, before any step, together: an unreadable image or mask, a mask whose size differs from its
image, a mask value that is neither a class nor the ignore index, and two-class masks that hold
only 0 and the ignore index (0/255 masks read as "all foreground is void").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .base import SPLITS, ArenaDataModule
from .checks import DataCheck
from .imagefolder import load_rgb
from .seg_transforms import PadCollate, eval_transforms, train_transforms
from .voc import image_set_ids

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_MODES = ("L", "P", "I", "I;16")
FOLDER_SPLITS = {"train": {"images": "train", "masks": "trainannot"},
                 "val": {"images": "val", "masks": "valannot"},
                 "test": {"images": "test", "masks": "testannot"}}
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_SPLITS = {"train": "train", "val": "val", "test": "val"}
MASK_FIX = "correct the mask, or remove it with its image"


def load_mask(path: Path) -> np.ndarray:
    """A single-channel index mask as HxW int64; an RGB or unreadable file raises ``ValueError`` naming it."""
    try:
        with Image.open(path) as m:
            if m.mode not in MASK_MODES:
                raise ValueError(f"mask {path} has mode {m.mode}; expected a single-channel index PNG "
                                 f"(one of the modes {MASK_MODES}) whose values are class indices")
            return np.asarray(m, dtype=np.int64)
    except OSError as e:
        raise ValueError(f"cannot read mask {path}: {e}. Remove or replace the file.") from e


class SegmentationFiles(Dataset):
    """``(image, mask)`` pairs of files, checked when read, with joint v2 ``transforms``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], *, num_classes: int, ignore_index: int,
                 transforms: Callable | None, mask_values: Mapping[int, int] | None = None) -> None:
        self.pairs = list(pairs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.transforms = transforms
        self.mask_values = {int(k): int(v) for k, v in (mask_values or {}).items()}

    def mask(self, path: Path) -> np.ndarray:
        """The mask at ``path`` with ``mask_values`` applied."""
        stored = load_mask(path)
        if not self.mask_values:
            return stored
        mask = stored.copy()
        for value, index in self.mask_values.items():
            mask[stored == value] = index
        return mask

    def value_problem(self, values: np.ndarray) -> str | None:
        """What is wrong with a mask holding ``values``, if anything."""
        bad = values[(values < 0) | ((values >= self.num_classes) & (values != self.ignore_index))]
        if not bad.size:
            return None
        return (f"holds values {bad[:10].tolist()} outside the classes 0..{self.num_classes - 1}; the only other "
                f"accepted value is ignore_index={self.ignore_index} (set data.ignore_index, data.class_names or "
                f"data.mask_values)")

    def inspect(self, pair: tuple[Path, Path], image_size: tuple[int, int] | None) -> tuple[np.ndarray, str | None]:
        """The values a mask holds and what is wrong with it: unreadable, another size than its image, bad values."""
        try:
            mask = self.mask(pair[1])
        except ValueError as e:
            return np.zeros(0, np.int64), str(e)
        if image_size is not None and mask.shape != image_size[::-1]:
            return np.zeros(0, np.int64), (f"is {mask.shape[1]}x{mask.shape[0]} but its image {pair[0].name} is "
                                           f"{image_size[0]}x{image_size[1]} (WxH); masks must have their image's size")
        values = np.flatnonzero(np.bincount(mask.ravel())) if mask.min(initial=0) >= 0 else np.unique(mask)
        return values, self.value_problem(values)

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The pair as stored (uint8 image, int64 mask), after the checks."""
        image_path, mask_path = self.pairs[index]
        image = np.asarray(load_rgb(str(image_path)))
        mask = self.mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]} (WxH); masks must have their image's size")
        problem = self.value_problem(np.unique(mask))
        if problem is not None:
            raise ValueError(f"mask {mask_path} {problem}")
        return tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def folder_pairs(image_dir: Path, mask_dir: Path, *, mask_suffix: str = ".png") -> list[tuple[Path, Path]]:
    """Each image of ``image_dir`` with the mask of the same stem in ``mask_dir``."""
    for d, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder {str(d)!r} does not exist; expected the layout "
                                    f"<root>/<images folder>/*.jpg with masks <root>/<masks folder>/*{mask_suffix} "
                                    f"(set data.splits)")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"image folder {str(image_dir)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = [(p, mask_dir / f"{p.stem}{mask_suffix}") for p in images]
    missing = [str(img) for img, m in pairs if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images have no mask in {mask_dir} (expected <stem>{mask_suffix}), "
                                f"e.g. {missing[:3]}")
    return pairs


def voc_pairs(root: Path, image_set: str) -> list[tuple[Path, Path]]:
    """The pairs listed in ``root/ImageSets/Segmentation/<image_set>.txt``."""
    listing = root / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not listing.is_file():
        have = sorted(p.stem for p in listing.parent.glob("*.txt")) if listing.parent.is_dir() else []
        raise FileNotFoundError(f"{str(listing)!r} does not exist (found {have}); expected the Pascal VOC layout "
                                f"root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png, "
                                f"root/ImageSets/Segmentation/<split>.txt")
    pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png")
             for i in image_set_ids(listing)]
    for image, mask in pairs:
        for path, what in ((image, "image"), (mask, "mask")):
            if not path.is_file():
                raise FileNotFoundError(f"{listing.name} lists {image.stem!r} but its {what} {path} does not exist")
    return pairs


class MaskFolderDataModule(ArenaDataModule):
    """Image folders with index-mask folders; ``splits`` maps each split to its two folder names.

    ``image_size`` is the square training crop (the backbone's input size when null);
    ``base_size`` (H, W) is what random rescaling scales by ``scale_range``.
    """

    def __init__(self, *, task: str, root: str, class_names: Sequence[str], ignore_index: int = 255,
                 splits: Mapping[str, Any] | None = None, image_size: int | None = None,
                 base_size: Sequence[int] = (512, 2048), scale_range: Sequence[float] = (0.5, 2.0),
                 hflip: bool = True, mask_suffix: str = ".png", mask_values: Mapping[int, int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(task=task, tasks=("segmentation",), **kwargs)
        if len(class_names) < 2:
            raise ValueError(f"class_names must name at least 2 classes, got {list(class_names)}")
        if 0 <= ignore_index < len(class_names):
            raise ValueError(f"ignore_index={ignore_index} is the index of class {class_names[ignore_index]!r}; "
                             f"use a value >= {len(class_names)} (255 by convention)")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root {str(self.root)!r} does not exist")
        if image_size is not None:
            self.data_config["input_size"] = (3, image_size, image_size)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.splits = dict(FOLDER_SPLITS if splits is None else splits)
        self.base_size, self.scale_range, self.hflip = tuple(base_size), tuple(scale_range), hflip
        self.mask_suffix = mask_suffix
        self.mask_values = dict(mask_values or {})

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        """The checked (image, mask) file pairs of ``split``."""
        if split not in self.splits:
            raise ValueError(f"data.splits has no {split!r}; it names {sorted(self.splits)}")
        return self.find_pairs(self.splits[split])

    def find_pairs(self, entry: Any) -> list[tuple[Path, Path]]:
        """The pairs of one ``splits`` entry: here ``{images: <folder>, masks: <folder>}``."""
        if not isinstance(entry, Mapping) or set(entry) != {"images", "masks"}:
            raise ValueError(f"each data.splits entry must be {{images: <folder>, masks: <folder>}}, got {entry!r}")
        return folder_pairs(self.root / entry["images"], self.root / entry["masks"], mask_suffix=self.mask_suffix)

    def make_dataset(self, split: str) -> SegmentationFiles:
        if split == "train":
            transforms = train_transforms(crop_size=self.image_size, base_size=self.base_size,
                                          scale_range=self.scale_range, hflip=self.hflip,
                                          ignore_index=self.ignore_index, mean=self.mean, std=self.std)
        else:
            transforms = eval_transforms(mean=self.mean, std=self.std)
        return SegmentationFiles(self.pairs(split), num_classes=self.num_classes, ignore_index=self.ignore_index,
                                 transforms=transforms, mask_values=self.mask_values)

    def check_data(self, check: DataCheck) -> None:
        """Every image and mask of every split; two-class masks holding only 0 and the ignore index are an error."""
        for split in SPLITS:
            ds: SegmentationFiles = self.datasets[split]
            sizes = check.images(image for image, _ in ds.pairs)
            if check.verify == "none":
                continue
            pairs = [p for p in ds.pairs if p[1] not in check.seen]
            check.seen.update(m for _, m in pairs)
            held: set[int] = set()
            for (_, mask), (values, problem) in zip(pairs, check.map(lambda p: ds.inspect(p, sizes.get(p[0])),
                                                                    pairs)):
                held.update(values.tolist())
                if problem is not None:
                    check.add(mask, problem, MASK_FIX)
            if self.num_classes == 2 and not self.mask_values and held == {0, self.ignore_index}:
                check.add(pairs[0][1].parent, f"every mask holds only the values 0 and {self.ignore_index}, which is "
                          f"data.ignore_index, so all non-zero pixels would be left out of loss and metrics",
                          f"for masks that store class 1 as {self.ignore_index} set "
                          f"data.mask_values='{{0: 0, {self.ignore_index}: 1}}' (or store the classes as 0..K-1)")

    @property
    def collate_fn(self) -> PadCollate:
        return PadCollate(ignore_index=self.ignore_index)


class VOCSegmentationDataModule(MaskFolderDataModule):
    """Pascal VOC segmentation; ``splits`` maps each split to an image-set name (``test`` reads ``val``)."""

    def __init__(self, *, task: str, root: str, class_names: Sequence[str] = VOC_CLASSES, ignore_index: int = 255,
                 splits: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(task=task, root=root, class_names=class_names, ignore_index=ignore_index,
                         splits=dict(VOC_SPLITS if splits is None else splits), **kwargs)

    def find_pairs(self, entry: Any) -> list[tuple[Path, Path]]:
        """The pairs of one image set, e.g. ``train`` for ``ImageSets/Segmentation/train.txt``."""
        return voc_pairs(self.root, str(entry))


__all__ = ["MaskFolderDataModule", "VOCSegmentationDataModule", "SegmentationFiles", "folder_pairs", "voc_pairs",
           "load_mask", "VOC_CLASSES"]
