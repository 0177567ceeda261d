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
