"""COCO JSON detection data: boxes, plus instance masks (polygons or RLE, via pycocotools) when present.

Each split names its annotation file and image folder, relative to ``root``::

    root/annotations/instances_train2017.json   root/train2017/*.jpg     (train: {ann_file, images})
    root/annotations/instances_val2017.json     root/val2017/*.jpg       (val, test: same; one may be absent)

Category ids become contiguous labels ``1..K`` in id order (COCO's gapped 1..90, or ids that start
at 0, work alike); ``category_ids[label - 1]`` is the original id and ``class_names[label - 1]``
its name. A category no split annotates (a parent category of an export, for instance) is left
out of the classes with a warning naming it. Crowd annotations are left out of training and
marked ``iscrowd`` for the metric. Boxes with zero or negative size are dropped with one warning
per file. Setup reports together: an image the annotations list but the folder lacks, an
annotation whose ``category_id`` is not in ``categories`` or whose ``image_id`` is not in ``images``.

>>> import json, tempfile
>>> from PIL import Image
>>> root = Path(tempfile.mkdtemp())
>>> Image.new("RGB", (40, 30)).save(root / "a.jpg")
>>> ann = {"images": [{"id": 7, "file_name": "a.jpg", "height": 30, "width": 40}],
...        "annotations": [{"id": 1, "image_id": 7, "category_id": 0, "bbox": [2, 3, 10, 5], "iscrowd": 0}],
...        "categories": [{"id": 0, "name": "cell"}]}
>>> _ = (root / "ann.json").write_text(json.dumps(ann))
>>> dm = CocoDetectionDataModule(task="detection", root=str(root), train={"ann_file": "ann.json", "images": "."},
...                     val={"ann_file": "ann.json", "images": "."}, image_size=64)
>>> dm.class_names, dm.num_classes, dm.has_masks
(['cell'], 2, False)
>>> dm.setup()
>>> dm.datasets["test"][0][1]["boxes"]
tensor([[ 2.,  3., 12.,  8.]])
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .det_transforms import DetectionDataModule, DetectionDataset, read_image, warn_degenerate

SPLIT_KEYS = ("ann_file", "images")


def load_coco(ann_file: Path) -> Any:
    """A ``pycocotools.coco.COCO`` index of ``ann_file`` (its progress prints silenced)."""
    from pycocotools.coco import COCO

    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(ann_file)!r} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(ann_file)!r} is not COCO detection JSON ({type(e).__name__}: {e}); it needs "
                         f"'images', 'annotations' and 'categories'") from e


def has_segmentation(ann: Mapping[str, Any]) -> bool:
    seg = ann.get("segmentation")
    return bool(seg) and (isinstance(seg, dict) or any(len(p) >= 6 for p in seg))


def xyxy(anns: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """The ``[N, 4]`` xyxy boxes of COCO annotations (whose ``bbox`` is xywh)."""
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)


class CocoDetectionDataset(DetectionDataset):
    """The images of one COCO annotation file, labels mapped through ``category_ids``."""

    def __init__(self, *, coco: Any, images: Path, category_ids: Sequence[int], transforms: Callable[..., Any],
                 masks: bool, keep_crowd: bool, source: str = "COCO annotations") -> None:
        super().__init__(transforms, source)
        self.coco, self.images, self.masks = coco, images, masks
        self.label_of = {c: i + 1 for i, c in enumerate(category_ids)}
        for a in coco.anns.values():
            self.check_annotation(a)
        self.ids = sorted(coco.getImgIds())
        for i in self.ids:
            path = images / coco.imgs[i]["file_name"]
            if not path.is_file():
                self.problems.append((source, f"image id {i} points to {path}, which does not exist",
                                      "add the image, or remove it and its annotations from the file"))
        self.anns: dict[int, list[dict[str, Any]]] = {}
        dropped, total, where = 0, 0, []
        for i in self.ids:
            anns = [a for a in coco.imgToAnns.get(i, []) if (keep_crowd or not a.get("iscrowd", 0))
                    and a["category_id"] in self.label_of]
            w_h = torch.tensor([a["bbox"][2:] for a in anns], dtype=torch.float32).reshape(-1, 2)
            bad = (w_h <= 0).any(1)
            self.anns[i] = [a for a, b in zip(anns, bad.tolist()) if not b]
            dropped, total = dropped + int(bad.sum()), total + len(anns)
            if bad.any():
                where.append(coco.imgs[i]["file_name"])
        warn_degenerate(dropped, total, source, where)

    def check_annotation(self, ann: Mapping[str, Any]) -> None:
        """Note an annotation whose image or category its file does not define, or whose category is no class."""
        where = f"{self.source} (annotation id {ann.get('id')})"
        image, category = ann.get("image_id"), ann.get("category_id")
        if image not in self.coco.imgs:
            self.problems.append((where, f"image_id {image} is not in 'images'",
                                  "add the image to 'images' or remove the annotation"))
        elif category not in self.coco.cats:
            self.problems.append((where, f"category_id {category} of {self.coco.imgs[image]['file_name']} is not in "
                                         f"'categories' (ids {sorted(self.coco.cats)})",
                                  "add the category to 'categories' or remove the annotation"))
        elif category not in self.label_of:
            self.problems.append((where, f"category_id {category} of {self.coco.imgs[image]['file_name']} is not "
                                         f"among the training classes' ids {sorted(self.label_of)}",
                                  "use one annotation file's 'categories' for every split"))

    def __len__(self) -> int:
        return len(self.ids)

    def files(self) -> list[tuple[Path, torch.Tensor, tuple[int, int] | None]]:
        out = []
        for i in self.ids:
            info = self.coco.imgs[i]
            size = (info["width"], info["height"]) if "width" in info and "height" in info else None
            out.append((self.images / info["file_name"], xyxy(self.anns[i]), size))
        return out

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.coco.imgs[self.ids[index]]
        image = read_image(self.images / info["file_name"])
        anns = self.anns[self.ids[index]]
        target = {
            "boxes": xyxy(anns),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        }
        if self.masks:
            h, w = image.shape[-2:]
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        return image, target


class CocoDetectionDataModule(DetectionDataModule):
    """COCO JSON detection: ``train`` is required, ``val`` and ``test`` stand in for each other."""

    def __init__(self, *, task: str, root: str, train: Mapping[str, str], val: Mapping[str, str] | None = None,
                 test: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(task=task, **kwargs)
        if val is None and test is None:
            raise ValueError("COCO data needs a val or a test split besides train: "
                             "val: {ann_file: ..., images: ...}")
        self.root = Path(root).expanduser()
        self.splits = {"train": train, "val": val or test, "test": test or val}
        for split, spec in self.splits.items():
            if set(spec) != set(SPLIT_KEYS):
                raise ValueError(f"COCO split {split!r} must give exactly {SPLIT_KEYS} (relative to root), "
                                 f"got {sorted(spec)}")
        self._cocos: dict[Path, Any] = {}
        coco = self.coco("train")
        used = {a.get("category_id") for split in self.splits for a in self.coco(split).anns.values()}
        self.category_ids = sorted(c for c in coco.cats if c in used)
        empty = [f"{c} ({coco.cats[c].get('name')})" for c in sorted(coco.cats) if c not in used]
        if not self.category_ids:
            raise ValueError(f"{self.root / train['ann_file']} annotates none of its categories; detection needs "
                             f"annotations")
        if empty:
            warnings.warn(f"{self.root / train['ann_file']}: categories {', '.join(empty)} have no annotations in "
                          f"any split; they are left out of the classes", stacklevel=2)
        self.class_names = [coco.cats[c]["name"] for c in self.category_ids]
        anns = [a for a in coco.anns.values() if not a.get("iscrowd", 0)]
        self.has_masks = bool(anns) and all(has_segmentation(a) for a in anns)

    def coco(self, split: str) -> Any:
        """The (cached) pycocotools index of a split's annotation file."""
        path = self.root / self.splits[split]["ann_file"]
        if path not in self._cocos:
            self._cocos[path] = load_coco(path)
        return self._cocos[path]

    def make_dataset(self, split: str) -> CocoDetectionDataset:
        return CocoDetectionDataset(coco=self.coco(split), images=self.root / self.splits[split]["images"],
                                    category_ids=self.category_ids, transforms=self.transforms(split),
                                    masks=self.has_masks, keep_crowd=split != "train",
                                    source=str(self.root / self.splits[split]["ann_file"]))


__all__ = ["CocoDetectionDataModule", "CocoDetectionDataset", "load_coco", "has_segmentation", "xyxy"]
