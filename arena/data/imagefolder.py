"""ImageFolder classification data: ``root/{train,val,test}/<class>/<image>``.

Preprocessing is timm's, resolved from the backbone (``timm.data.create_transform`` with the
backbone's mean, std, input size, interpolation and crop), so pretrained weights see what they
were trained on. ``val`` falls back to ``test`` and vice versa when only one exists. Setup checks
every image of every split (``arena.data.checks``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from .base import SPLITS, ArenaDataModule
from .checks import DataCheck

LAYOUT = "root/train/<class>/*.jpg plus root/val/<class>/ and/or root/test/<class>/"


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; a corrupt file raises ``ValueError`` naming it.

    16-bit greyscale (PIL mode ``I;16``) keeps its top 8 bits: PIL's own conversion would clip it at 255.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode.startswith("I;16"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Remove or replace the file.") from e


def _split_dirs(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} does not exist; expected the layout {LAYOUT}")
    found = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" not in found or not ({"val", "test"} & set(found)):
        raise FileNotFoundError(f"data.root {str(root)!r} holds {sorted(p.name for p in root.iterdir())}; "
                                f"expected the layout {LAYOUT}")
    found.setdefault("val", found.get("test"))
    found.setdefault("test", found["val"])
    return found


def _classes(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class folders; expected the layout {LAYOUT}")
    return classes


class ImageFolderDataModule(ArenaDataModule):
    """Classification from class folders, with the backbone's own timm preprocessing."""

    def __init__(self, *, task: str, root: str, image_size: int | None = None, train_augment: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(task=task, tasks=("classification",), **kwargs)
        if image_size is not None:
            self.data_config["input_size"] = (3, image_size, image_size)
        self.dirs = _split_dirs(Path(root).expanduser())
        self.class_names = _classes(self.dirs["train"])
        for split in ("val", "test"):
            other = _classes(self.dirs[split])
            if other != self.class_names:
                raise ValueError(f"class folders of {self.dirs[split]} ({len(other)}) differ from train's "
                                 f"({len(self.class_names)}): {sorted(set(other) ^ set(self.class_names))[:10]}")
        self.num_classes = len(self.class_names)
        self.train_augment = train_augment

    def make_dataset(self, split: str) -> ImageFolder:
        from timm.data import create_transform

        cfg = {k: self.data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
               if k in self.data_config}
        transform = create_transform(**cfg, is_training=split == "train" and self.train_augment)
        return ImageFolder(str(self.dirs[split]), transform=transform, loader=load_rgb)

    def check_data(self, check: DataCheck) -> None:
        check.images(Path(p) for split in SPLITS for p, _ in self.datasets[split].samples)
