"""Pascal VOC XML detection data::

    root/JPEGImages/<file>          root/Annotations/<id>.xml          root/ImageSets/Main/{train,val,test}.txt

VOC corners are 1-based and inclusive; they become 0-based xyxy ``(xmin - 1, ymin - 1, xmax, ymax)``.
``difficult`` objects are left out of training and marked ``iscrowd`` so the metric ignores them,
as VOC's own evaluation does. Class names are ``classes`` in the given order or, when it is
null, every name the annotations of all splits use, sorted. Boxes with zero or negative size
are dropped with one warning per split; ``val`` and ``test`` stand in for each other. A missing
or broken annotation file, a missing image or an unknown class is reported at setup, all together.

>>> import tempfile
>>> from PIL import Image
>>> root = Path(tempfile.mkdtemp())
>>> for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
...     (root / d).mkdir(parents=True)
>>> Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "a.jpg")
>>> _ = (root / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</filename><object><name>cat</name>"
...     "<bndbox><xmin>3</xmin><ymin>4</ymin><xmax>12</xmax><ymax>8</ymax></bndbox></object></annotation>")
>>> for split in ("train", "val"):
...     _ = (root / "ImageSets" / "Main" / f"{split}.txt").write_text("a\\n")
>>> dm = VOCDetectionDataModule(task="detection", root=str(root), image_size=64)
>>> dm.setup()
>>> dm.class_names, dm.datasets["val"][0][1]["boxes"]
(['cat'], tensor([[ 2.,  3., 12.,  8.]]))
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .det_transforms import (DetectionDataModule, DetectionDataset, degenerate, read_image,
                             warn_degenerate)

LAYOUT = "root/JPEGImages/, root/Annotations/<id>.xml, root/ImageSets/Main/{train,val,test}.txt"


@dataclass
class VOCRecord:
    """One annotation file: the image's file name and its objects."""

    xml: Path
    filename: str
    names: list[str]
    boxes: torch.Tensor  # [N, 4] xyxy, 0-based
    difficult: torch.Tensor  # [N] bool
    degenerate: torch.Tensor  # [N] bool: VOC corners with xmax <= xmin or ymax <= ymin


def _text(node: ET.Element, tag: str, xml: Path) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise ValueError(f"{xml}: <{node.tag}> lacks <{tag}>")
    return found.text.strip()


def parse_voc_xml(xml: Path) -> VOCRecord:
    """Read one VOC annotation file; ``FileNotFoundError``/``ValueError`` name a missing or broken one."""
    if not xml.is_file():
        raise FileNotFoundError(f"VOC annotation {str(xml)!r} does not exist (listed in ImageSets/Main)")
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml} is not valid XML: {e}") from e
    filename = root.findtext("filename", default=f"{xml.stem}.jpg").strip()
    objects = root.findall("object")
    names = [_text(o, "name", xml) for o in objects]
    boxes = []
    for o in objects:
        box = o.find("bndbox")
        if box is None:
            raise ValueError(f"{xml}: an <object> lacks <bndbox>")
        boxes.append([float(_text(box, k, xml)) for k in ("xmin", "ymin", "xmax", "ymax")])
    corners = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    difficult = torch.tensor([o.findtext("difficult", default="0").strip() == "1" for o in objects], dtype=torch.bool)
    return VOCRecord(xml, filename, names, corners - torch.tensor([1.0, 1.0, 0.0, 0.0]), difficult,
                     degenerate(corners))


class VOCDetectionDataset(DetectionDataset):
    """The images of one ``ImageSets/Main`` list, labelled by their index in ``class_names`` plus one."""

    def __init__(self, *, records: Sequence[VOCRecord], images: Path, class_names: Sequence[str],
                 transforms: Callable[..., Any], keep_difficult: bool, source: str = "VOC",
                 problems: Sequence[tuple[str, str, str]] = ()) -> None:
        super().__init__(transforms, source)
        self.images = images
        self.problems.extend(problems)
        label_of = {n: i + 1 for i, n in enumerate(class_names)}
        self.samples: list[tuple[Path, dict[str, torch.Tensor]]] = []
        dropped, total, where = 0, 0, []
        for r in records:
            path = images / r.filename
            if not path.is_file():
                self.problems.append((str(r.xml), f"points to the image {path}, which does not exist",
                                      "add the image, or remove the annotation and its line in ImageSets/Main"))
                continue
            unknown = sorted(set(r.names) - set(label_of))
            if unknown:
                self.problems.append((str(r.xml), f"classes {unknown} are not in data.classes {list(class_names)}",
                                      "add them to data.classes, or set data.classes=null to use every name"))
                continue
            keep = ~r.degenerate
            if not keep.all():
                dropped, where = dropped + int((~keep).sum()), where + [r.xml.name]
            total += len(r.names)
            if not keep_difficult:
                keep &= ~r.difficult
            labels = torch.tensor([label_of[n] for n in r.names], dtype=torch.int64)
            self.samples.append((path, {"boxes": r.boxes[keep], "labels": labels[keep], "iscrowd": r.difficult[keep]}))
        warn_degenerate(dropped, total, f"VOC annotations in {records[0].xml.parent}" if records else "VOC", where)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        path, target = self.samples[index]
        return read_image(path), target

    def files(self) -> list[tuple[Path, torch.Tensor, tuple[int, int] | None]]:
        return [(path, target["boxes"], None) for path, target in self.samples]


class VOCDetectionDataModule(DetectionDataModule):
    """Pascal VOC detection from ``root`` (see the module docstring for the layout)."""

    def __init__(self, *, task: str, root: str, classes: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(task=task, **kwargs)
        self.root = Path(root).expanduser()
        lists = self.root / "ImageSets" / "Main"
        found = {s: lists / f"{s}.txt" for s in ("train", "val", "test") if (lists / f"{s}.txt").is_file()}
        if not (self.root / "JPEGImages").is_dir() or "train" not in found or not {"val", "test"} & set(found):
            raise FileNotFoundError(f"data.root {str(self.root)!r} is not a VOC dataset with train and val or test "
                                    f"lists; expected {LAYOUT}")
        found.setdefault("val", found.get("test"))
        found.setdefault("test", found["val"])
        self.lists = found
        self.records: dict[str, list[VOCRecord]] = {}
        self.broken: dict[str, list[tuple[str, str, str]]] = {}  # annotation files that cannot be read
        for split, listing in found.items():
            self.records[split], self.broken[split] = [], []
            for i in image_set_ids(listing):
                try:
                    self.records[split].append(parse_voc_xml(self.root / "Annotations" / f"{i}.xml"))
                except (FileNotFoundError, ValueError) as e:
                    self.broken[split].append((f"{listing} line {i!r}", str(e),
                                               "add or repair the annotation file, or remove the line"))
        used = sorted({n for rs in self.records.values() for r in rs for n in r.names})
        self.class_names = list(classes) if classes is not None else used

    def make_dataset(self, split: str) -> VOCDetectionDataset:
        return VOCDetectionDataset(records=self.records[split], images=self.root / "JPEGImages",
                                   class_names=self.class_names, transforms=self.transforms(split),
                                   keep_difficult=split != "train", source=str(self.lists[split]),
                                   problems=self.broken[split])


def image_set_ids(path: Path) -> list[str]:
    """The image ids of a VOC ``ImageSets`` list (first column; class lists add a second)."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


__all__ = ["VOCDetectionDataModule", "VOCDetectionDataset", "VOCRecord", "parse_voc_xml", "image_set_ids"]
