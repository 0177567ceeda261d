"""``shapes``: the embedded dataset, procedurally generated scenes with all three kinds of label.

Each scene is a textured background (oriented stripes in two tints of one grey level, plus
noise) with one large object and 1-3 smaller distractors of random class, tint, scale and
rotation, drawn in random order so that objects occlude each other. Objects differ from the
background by brightness (``CONTRAST``), and colour varies as a tint around a grey level: with
free RGB colours for objects and background, neither ResNet-18 nor FastViT-T8 learned the
shapes within a few hundred CPU steps (ResNet-18 after 150 steps on single objects: top-1
18-37%, against 53-71% for black-and-white ones). One scene gives:

- ``label``: the class of the largest object (classification),
- ``boxes``/``labels``/``masks``: tight boxes and instance masks of the visible parts (detection),
- ``semantic``: the per-pixel class of the topmost object, 0 for background (segmentation).

Scenes are a pure function of ``(seed, split, index)``, so every run, worker and machine sees the
same data, with nothing to download.

A second style, ``sketch``, is the built-in distribution shift (the OOD test set of a
classification run, ``data.ood_tests=[sketch]``): the same kinds of scene with every object drawn
as its outline only (``SKETCH_LINE`` pixels per 64 of image side) on a different background, a
strongly tinted paper-like gradient with fine grain instead of stripes. Labels keep their
meaning (masks and boxes cover the drawn outlines). The default style is unchanged by it.

>>> s = render_scene(np.random.default_rng(0), size=64)
>>> s.image.shape, s.semantic.shape, int(s.semantic.max()) <= len(CLASSES)
((64, 64, 3), (64, 64), True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .base import ArenaDataModule, detection_collate, normalize

CLASSES = ("circle", "triangle", "square", "star", "cross", "ring")
SPLITS = {"train": 0, "val": 1, "test": 2}
MIN_VISIBLE_FRACTION = 0.004  # of the image area, below which an occluded instance is dropped
CONTRAST = 150.0  # least grey-level step from the background to an object
CHROMA = 30.0  # std of the colour tint around a grey level
TEXTURE = 30.0  # std of the colour step between the two background stripes
STYLES = ("default", "sketch")
SKETCH_TINT = 60.0  # std of the sketch background's colour around its grey level
SKETCH_LINE = 2.0  # outline width of sketch objects, in pixels per 64 pixels of image side


@dataclass
class Scene:
    image: np.ndarray  # HxWx3 uint8
    label: int  # class of the largest object, 0..K-1
    boxes: np.ndarray  # Nx4 float32 xyxy of visible parts
    labels: np.ndarray  # N int64, 0..K-1
    masks: np.ndarray  # NxHxW bool, visible parts
    semantic: np.ndarray  # HxW uint8, 0 background, k+1 for class k


def _inside(cls: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Membership of rotated coordinates (u, v) in a shape of class ``cls`` and radius ``r``."""
    rho = np.hypot(u, v)
    if cls == "circle":
        return rho <= r
    if cls == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if cls in ("triangle", "square"):
        n = 3 if cls == "triangle" else 4
        apothem = r * np.cos(np.pi / n)
        inside = np.ones_like(u, dtype=bool)
        for k in range(n):
            a = 2 * np.pi * k / n
            inside &= u * np.cos(a) + v * np.sin(a) <= apothem
        return inside
    if cls == "star":
        phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        return rho <= r * (0.42 + 0.58 * np.abs(1 - 2 * phase))
    if cls == "cross":
        w = r / 3
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= r))
    raise ValueError(f"unknown shape class {cls!r}; classes are {CLASSES}")


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray,
                level: float) -> np.ndarray:
    """Oriented stripes between two tints of grey ``level`` plus pixel noise."""
    c0 = level + rng.normal(0, CHROMA, 3)
    c1 = c0 + rng.normal(0, TEXTURE, 3)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(1.0, 6.0) * 2 * np.pi / size
    t = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    img = c0 * t[..., None] + c1 * (1 - t[..., None])
    return img + rng.normal(0, rng.uniform(2, 12), img.shape)


def _paper(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, level: float) -> np.ndarray:
    """The sketch style's background: a linear gradient between two strong tints of grey ``level``, fine grain."""
    c0 = level + rng.normal(0, SKETCH_TINT, 3)
    c1 = level + rng.normal(0, SKETCH_TINT, 3)
    theta = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(theta) + yy * np.sin(theta)) / size * 0.5 + 0.5).clip(0, 1)
    img = c0 * t[..., None] + c1 * (1 - t[..., None])
    return img + rng.normal(0, 4, img.shape)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` pixels of its border (mask minus its erosion)."""
    h, w = mask.shape
    padded = np.pad(mask, width, constant_values=False)
    inner = mask.copy()
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            inner &= padded[dy:dy + h, dx:dx + w]
    return mask & ~inner


def render_scene(rng: np.random.Generator, *, size: int = 64, max_distractors: int = 3,
                 distractor_scale: tuple[float, float] = (0.08, 0.5), style: str = "default") -> Scene:
    """Draw one scene; see the module docstring for what it contains.

    Distractor radii are drawn from ``distractor_scale`` times the main object's radius. Objects
    stand out by brightness: on a dark background they are bright, on a bright one dark, each
    at least ``CONTRAST`` grey levels away, with their own tint. ``style="sketch"`` draws the
    outlines of the objects on a tinted gradient instead.
    """
    if style not in STYLES:
        raise ValueError(f"unknown shapes style {style!r}; styles are {STYLES}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    level = rng.uniform(0, 255)
    img = _background(rng, size, yy, xx, level) if style == "default" else _paper(rng, size, yy, xx, level)
    polarity = 1.0 if level < 127.5 else -1.0
    n = 1 + int(rng.integers(1, max_distractors + 1))
    main_r = rng.uniform(0.17, 0.30) * size
    radii = [main_r] + [rng.uniform(*distractor_scale) * main_r for _ in range(n - 1)]
    classes = rng.integers(0, len(CLASSES), n)
    owner = np.full((size, size), -1, dtype=np.int64)
    for i in rng.permutation(n):
        r = radii[i]
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        rot = rng.uniform(0, 2 * np.pi)
        dx, dy = xx - cx, yy - cy
        u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
        shape = _inside(CLASSES[classes[i]], u, v, r)
        if style == "sketch":
            shape = _outline(shape, max(1, round(SKETCH_LINE * size / 64)))
        grey = np.clip(level + polarity * rng.uniform(CONTRAST, 255), 0, 255)
        colour = grey + rng.normal(0, CHROMA, 3) + rng.normal(0, 6, (size, size, 3))
        img = np.where(shape[..., None], colour, img)
        owner[shape] = i
    masks, keep = [], []
    for i in range(n):
        m = owner == i
        if m.sum() >= max(4, MIN_VISIBLE_FRACTION * size * size):
            masks.append(m)
            keep.append(i)
    boxes = np.array([[np.where(m.any(0))[0][0], np.where(m.any(1))[0][0],
                       np.where(m.any(0))[0][-1] + 1, np.where(m.any(1))[0][-1] + 1] for m in masks],
                     dtype=np.float32).reshape(-1, 4)
    semantic = np.where(owner >= 0, classes[np.maximum(owner, 0)] + 1, 0)
    return Scene(
        image=np.clip(img, 0, 255).astype(np.uint8),
        label=int(classes[0]),
        boxes=boxes,
        labels=classes[keep].astype(np.int64),
        masks=np.stack(masks) if masks else np.zeros((0, size, size), bool),
        semantic=semantic.astype(np.uint8),
    )


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` scenes of one split; ``view`` picks the label format of a task.

    With ``fresh=True`` (the training split by default) every item is a new scene drawn with
    torch's RNG (seeded per run and worker by Lightning), so no scene is seen twice and a model
    cannot memorize the training set; otherwise scenes are fixed by index and kept in memory
    (``cache=True``). ``style`` picks the drawing style (``STYLES``).
    """

    VIEWS = ("classification", "detection", "segmentation")

    def __init__(self, *, split: str, length: int, image_size: int, view: str, seed: int = 0,
                 mean: tuple[float, ...], std: tuple[float, ...], hflip: bool = False, cache: bool = True,
                 fresh: bool = False, style: str = "default") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if view not in self.VIEWS:
            raise ValueError(f"shapes serves the tasks {self.VIEWS}, got {view!r}")
        if image_size < 32:
            raise ValueError(f"shapes needs image_size >= 32, got {image_size}")
        if style not in STYLES:
            raise ValueError(f"unknown shapes style {style!r}; styles are {STYLES}")
        self.style = style
        self.split, self.length, self.size, self.view = split, length, image_size, view
        self.seed, self.mean, self.std, self.hflip = seed, mean, std, hflip
        self.fresh = fresh
        self.cache: dict[int, Scene] | None = {} if cache and not fresh else None

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        s = render_scene(np.random.default_rng((self.seed, SPLITS[self.split], index)), size=self.size,
                         style=self.style)
        if self.cache is not None:
            self.cache[index] = s
        return s

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        s = self.scene(self.length + int(torch.randint(0, 2**31 - 1, ())) if self.fresh else index)
        raw = torch.from_numpy(s.image).permute(2, 0, 1)
        # torchvision's detectors normalise inside (GeneralizedRCNNTransform): detection takes [0, 1] images
        image = raw.float() / 255.0 if self.view == "detection" else normalize(raw, self.mean, self.std)
        semantic = torch.from_numpy(s.semantic).long()
        boxes, masks = torch.from_numpy(s.boxes), torch.from_numpy(s.masks)
        flip = self.hflip and bool(torch.rand(()) < 0.5)  # torch's RNG: seeded per run and worker by Lightning
        if flip:
            image, semantic, masks = image.flip(-1), semantic.flip(-1), masks.flip(-1)
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        if self.view == "classification":
            return image, s.label
        if self.view == "segmentation":
            return image, semantic
        # torchvision detectors reserve label 0 for the background
        return image, {"boxes": boxes, "labels": torch.from_numpy(s.labels) + 1, "masks": masks.to(torch.uint8)}


class ShapesDataModule(ArenaDataModule):
    """The embedded default data: generated on the fly, identical for a given seed.

    Retrieval uses the classification labels (class = identity). A classification run also tests
    on each style in ``ood_tests`` (``num_test`` scenes drawn in that style, test set
    ``ood/<style>``); kNN reads the fixed (non-fresh, unflipped) training scenes as ``bank``.
    """

    def __init__(self, *, task: str, image_size: int = 64, num_train: int = 4000, num_val: int = 500,
                 num_test: int = 1000, seed: int = 0, hflip: bool = True, fresh_train: bool = True,
                 ood_tests: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(task=task, tasks=(*ShapesDataset.VIEWS, "retrieval"), **kwargs)
        shifts = [s for s in STYLES if s != "default"]
        bad = [s for s in ood_tests if s not in shifts]
        if bad:
            raise ValueError(f"data.ood_tests names shapes styles; {bad} are not among {shifts}. "
                             f"Set e.g. data.ood_tests=[{shifts[0]}], or [] for none")
        self.image_size_ = image_size
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed, self.hflip, self.fresh_train = seed, hflip, fresh_train
        self.view = "classification" if task == "retrieval" else task
        self.class_names = list(CLASSES)
        if task == "segmentation":
            self.class_names = ["background", *CLASSES]
        self.num_classes = len(self.class_names) if task != "detection" else len(CLASSES) + 1
        if task == "classification":
            self.test_splits += [f"ood/{style}" for style in ood_tests]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.image_size_, self.image_size_)

    def has_split(self, split: str) -> bool:
        return split == "bank" or split in self.test_splits

    def make_dataset(self, split: str) -> ShapesDataset:
        common = dict(image_size=self.image_size_, view=self.view, seed=self.seed, mean=self.mean, std=self.std)
        if split == "bank":
            return ShapesDataset(split="train", length=self.sizes["train"], cache=False, **common)
        if split.startswith("ood/"):
            return ShapesDataset(split="test", length=self.sizes["test"], style=split[len("ood/"):], **common)
        return ShapesDataset(split=split, length=self.sizes[split], hflip=self.hflip and split == "train",
                             fresh=self.fresh_train and split == "train", **common)

    @property
    def collate_fn(self) -> Callable | None:
        return detection_collate if self.task == "detection" else None
