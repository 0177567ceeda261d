"""ImageFolder classification data: ``root/{train,val,test}/<class>/<image>``.

Preprocessing is timm's, resolved from the backbone (``timm.data.create_transform`` with the
backbone's mean, std, input size, interpolation and crop), so pretrained weights see what they
were trained on. ``val`` falls back to ``test`` and vice versa when only one exists. Setup checks
every image of every split, OOD sets included (``arena.data.checks``).

Retrieval reads ``root/query/<class>/`` against ``root/gallery/<class>/`` when both exist, else
the test split leave-one-out, and needs no ``train/``. ``ood_tests={name: folder}`` adds test sets
of a classification run (``<folder>/<class>/``, a subset of the training classes, checked up front).
Labels are indices into one class list (the training classes; for query/gallery their union), so
a folder holding only some classes keeps the others' labels.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from .base import ArenaDataModule
from .checks import DataCheck

LAYOUT = "root/train/<class>/*.jpg plus root/val/<class>/ and/or root/test/<class>/"
RETRIEVAL_LAYOUT = "root/query/<class>/ and root/gallery/<class>/, or root/test/<class>/ (leave-one-out)"
SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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


def _split_dirs(root: Path, task: str) -> dict[str, Path]:
    layout = RETRIEVAL_LAYOUT if task == "retrieval" else LAYOUT
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} does not exist; expected the layout {layout}")
    found = {s: root / s for s in ("train", "val", "test", "query", "gallery") if (root / s).is_dir()}
    if task == "retrieval":
        if {"query", "gallery"} <= set(found):
            return {"test": found["query"], "gallery": found["gallery"]}
        if not ({"val", "test"} & set(found)):
            raise FileNotFoundError(f"data.root {str(root)!r} holds {sorted(p.name for p in root.iterdir())}; "
                                    f"expected the layout {layout}")
        return {"test": found.get("test", found.get("val"))}
    if "train" not in found or not ({"val", "test"} & set(found)):
        raise FileNotFoundError(f"data.root {str(root)!r} holds {sorted(p.name for p in root.iterdir())}; "
                                f"expected the layout {LAYOUT}")
    found.setdefault("val", found.get("test"))
    found.setdefault("test", found["val"])
    found["bank"] = found["train"]
    return found


def _classes(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class folders; expected the layout {LAYOUT}")
    return classes


class ClassFolder(ImageFolder):
    """``ImageFolder`` whose labels index ``classes`` (a list that may name classes the folder lacks)."""

    def __init__(self, root: str, *, classes: list[str], **kwargs: Any) -> None:
        self.all_classes = classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = _classes(Path(directory))
        unknown = sorted(set(present) - set(self.all_classes))
        if unknown:
            raise ValueError(f"class folders {unknown[:10]} of {directory} are not among the "
                             f"{len(self.all_classes)} classes {self.all_classes[:10]}...; rename or remove them")
        return present, {c: self.all_classes.index(c) for c in present}


class ImageFolderDataModule(ArenaDataModule):
    """Classification (and retrieval) from class folders, with the backbone's own timm preprocessing."""

    def __init__(self, *, task: str, root: str, image_size: int | None = None, train_augment: bool = True,
                 ood_tests: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(task=task, tasks=("classification", "retrieval"), **kwargs)
        if image_size is not None:
            self.data_config["input_size"] = (3, image_size, image_size)
        self.dirs = _split_dirs(Path(root).expanduser(), task)
        if task == "retrieval":
            self.class_names = sorted({c for d in self.dirs.values() for c in _classes(d)})
        else:
            self.class_names = _classes(self.dirs["train"])
            for split in ("val", "test"):
                other = _classes(self.dirs[split])
                if other != self.class_names:
                    raise ValueError(f"class folders of {self.dirs[split]} ({len(other)}) differ from train's "
                                     f"({len(self.class_names)}): {sorted(set(other) ^ set(self.class_names))[:10]}")
            self._add_ood_tests(dict(ood_tests or {}))
        self.num_classes = len(self.class_names)
        self.train_augment = train_augment
        self.checked_splits = tuple(split for split in self.dirs if split != "bank")

    def _add_ood_tests(self, ood_tests: dict[str, str]) -> None:
        """Check every OOD folder now, before anything trains: a safe name, class folders among train's."""
        for name, folder in ood_tests.items():
            if not SET_NAME.match(str(name)):
                raise ValueError(f"data.ood_tests name {name!r} must use only letters, digits, '_', '.', '-'")
            path = Path(str(folder)).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"data.ood_tests.{name}={str(path)!r} does not exist; expected a folder "
                                        f"of <class>/ folders named like the training classes")
            unknown = sorted(set(_classes(path)) - set(self.class_names))
            if unknown:
                raise ValueError(f"data.ood_tests.{name}: class folders {unknown[:10]} of {path} are not training "
                                 f"classes ({', '.join(self.class_names[:10])}...); an OOD test set must use the "
                                 f"training classes' folder names")
            self.dirs[f"ood/{name}"] = path
            self.test_splits.append(f"ood/{name}")

    def has_split(self, split: str) -> bool:
        return split in self.dirs

    def make_dataset(self, split: str) -> ImageFolder:
        from timm.data import create_transform

        if split not in self.dirs:
            raise ValueError(f"split {split!r} is not in data.root; it holds {sorted(self.dirs)}")
        cfg = {k: self.data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
               if k in self.data_config}
        transform = create_transform(**cfg, is_training=split == "train" and self.train_augment)
        return ClassFolder(str(self.dirs[split]), classes=self.class_names, transform=transform, loader=load_rgb)

    def check_data(self, check: DataCheck) -> None:
        check.images(Path(p) for split in self.checked_splits for p, _ in self.datasets[split].samples)
