"""The embedded ``shapes`` data: deterministic scenes whose three label kinds agree with each other."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from arena.data.shapes import CLASSES, CONTRAST, MIN_VISIBLE_FRACTION, ShapesDataModule, ShapesDataset, render_scene

KW = dict(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_scenes_are_a_function_of_seed_split_and_index() -> None:
    a = ShapesDataset(split="val", length=4, view="classification", **KW)
    b = ShapesDataset(split="val", length=4, view="classification", cache=False, **KW)
    other_split = ShapesDataset(split="test", length=4, view="classification", **KW)
    other_seed = ShapesDataset(split="val", length=4, view="classification", seed=1, **KW)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert not torch.equal(a[i][0], other_split[i][0])
        assert not torch.equal(a[i][0], other_seed[i][0])


def test_fresh_training_scenes_differ_between_draws_and_follow_the_torch_seed() -> None:
    ds = ShapesDataset(split="train", length=2, view="classification", fresh=True, **KW)
    torch.manual_seed(0)
    first = ds[0][0]
    assert not torch.equal(first, ds[0][0])  # a new scene every time
    torch.manual_seed(0)
    assert torch.equal(first, ds[0][0])  # reproducible under the run's seed


def test_boxes_masks_and_semantic_map_agree() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = render_scene(rng, size=64)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert len(s.boxes) == len(s.labels) == len(s.masks) >= 1
        covered = np.zeros((64, 64), bool)
        for box, label, mask in zip(s.boxes, s.labels, s.masks):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight xyxy
            assert (s.semantic[mask] == label + 1).all()
            assert not (covered & mask).any()  # visible parts do not overlap
            covered |= mask
        sliver = max(4, MIN_VISIBLE_FRACTION * 64 * 64)  # visible parts below this have no instance
        assert (s.semantic[~covered] != 0).sum() < 3 * sliver  # the rest is background or such slivers
        assert 0 <= s.label < len(CLASSES)


def test_the_class_label_is_the_largest_object_and_objects_stand_out() -> None:
    rng = np.random.default_rng(1)
    agree = 0
    for _ in range(50):
        s = render_scene(rng, size=64)
        largest = int(np.argmax([m.sum() for m in s.masks]))
        agree += int(s.labels[largest]) == s.label
        gap = abs(s.image[s.masks[largest]].mean() - s.image[s.semantic == 0].mean())
        assert gap > CONTRAST / 3  # a brightness step, blurred only by tints and noise
    # distractors are at most half the main object's radius; only heavy occlusion can hide it
    assert agree >= 45


def test_views_and_bad_arguments() -> None:
    det = ShapesDataset(split="val", length=1, view="detection", **KW)
    image, target = det[0]
    assert 0 <= image.min() and image.max() <= 1  # torchvision detectors normalise inside
    assert target["labels"].min() >= 1 and target["masks"].shape[1:] == (64, 64)
    seg = ShapesDataset(split="val", length=1, view="segmentation", **KW)
    assert seg[0][1].shape == (64, 64) and seg[0][1].max() <= len(CLASSES)
    assert ShapesDataModule(task="segmentation").num_classes == len(CLASSES) + 1
    with pytest.raises(ValueError, match="shapes serves the tasks"):
        ShapesDataset(split="val", length=1, view="depth", **KW)
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset(split="dev", length=1, view="classification", **KW)
    with pytest.raises(IndexError):
        det[1]


def test_default_style_is_unchanged_by_the_sketch_style() -> None:
    """Every label and pixel of the default style as before the sketch style existed (hash of 36 scenes)."""
    import hashlib

    h = hashlib.sha256()
    for split in range(3):
        for i in range(12):
            s = render_scene(np.random.default_rng((0, split, i)), size=64)
            for a in (s.image, s.boxes, s.labels, s.masks, s.semantic, np.array([s.label])):
                h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == "a387f54ac80c951676ec4be4ac44ea19ad5504cfe7c2821a3a64421cc1d407f7"


def test_sketch_style_draws_outlines_and_is_the_ood_test_set() -> None:
    from arena.data.shapes import _outline

    square = np.zeros((12, 12), bool)
    square[1:11, 1:11] = True
    ring = _outline(square, 2)
    assert ring.sum() == 100 - 36 and not ring[3:9, 3:9].any() and ring[1, 1] and ring[10, 5]
    rng = lambda: np.random.default_rng((0, 2, 5))  # noqa: E731
    sketch = render_scene(rng(), size=64, style="sketch")
    default = render_scene(rng(), size=64)
    assert sketch.image.shape == default.image.shape and not np.array_equal(sketch.image, default.image)
    box_area = np.prod(sketch.boxes[:, 2:] - sketch.boxes[:, :2], axis=1).sum()
    assert 0 < sketch.masks.sum() < 0.6 * box_area  # outlines cover a fraction of their boxes
    dm = ShapesDataModule(task="classification", num_test=8, ood_tests=["sketch"])
    assert dm.test_splits == ["test", "ood/sketch"] and dm.make_dataset("ood/sketch").style == "sketch"
    assert ShapesDataModule(task="segmentation", ood_tests=["sketch"]).test_splits == ["test"]
    with pytest.raises(ValueError, match="styles"):
        ShapesDataModule(task="classification", ood_tests=["cartoon"])
    with pytest.raises(ValueError, match="unknown shapes style"):
        render_scene(rng(), style="cartoon")
