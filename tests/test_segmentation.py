"""Semantic segmentation: mIoU from one confusion matrix, heads on every family, data layouts, runs, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix

from arena.data.masks import MaskFolderDataModule, VOCSegmentationDataModule
from arena.data.seg_transforms import PadCollate
from arena.records import read_record
from arena.tasks.segmentation import SegmentationTask, _window_starts, segmentation_scores
from backbones import create_backbone, list_backbones
from heads import SEGMENTATION_HEADS, build_segmentation_head
from eval import evaluate
from train import train

DATASETS = Path(__file__).parents[1] / ".." / "shared" / "datasets"
CLASSES = ("sky", "road", "car")


def _confusion(preds: list[torch.Tensor], targets: list[torch.Tensor], num_classes: int = 3,
               ignore_index: int = 255) -> torch.Tensor:
    cm = MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    return cm.compute()


# --- metrics -------------------------------------------------------------------------------------------------

def test_perfect_prediction_scores_one() -> None:
    mask = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    s = segmentation_scores(_confusion([mask], [mask]))
    assert float(s["miou"]) == 1.0 and float(s["pixel_acc"]) == 1.0
    assert s["iou"].tolist() == [1.0, 1.0, 1.0]


def test_ignored_pixels_count_nowhere() -> None:
    target = torch.tensor([[[0, 1, 255, 255]]])
    pred = torch.tensor([[[0, 1, 2, 1]]])  # wrong only where the truth is void
    cm = _confusion([pred], [target])
    assert int(cm.sum()) == 2
    s = segmentation_scores(cm)
    assert float(s["miou"]) == 1.0 and float(s["pixel_acc"]) == 1.0


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])
    s = segmentation_scores(_confusion([pred], [target]))
    assert s["iou"][0].item() == pytest.approx(1 / 2) and s["iou"][1].item() == pytest.approx(2 / 3)
    assert math.isnan(s["iou"][2].item())
    assert s["miou"].item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a class predicted but never true has IoU 0 and does count
    s = segmentation_scores(_confusion([torch.tensor([[[0, 2, 1, 1]]])], [target]))
    assert s["iou"][2].item() == 0.0 and s["miou"].item() == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_miou_is_dataset_level_not_a_mean_over_images() -> None:
    # image 1: 1 pixel of class 1, missed; image 2: 3 pixels of class 1, all found
    t1, p1 = torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[0, 0, 0, 0]]])
    t2, p2 = torch.tensor([[[0, 1, 1, 1]]]), torch.tensor([[[0, 1, 1, 1]]])
    s = segmentation_scores(_confusion([p1, p2], [t1, t2], num_classes=2))
    # over the split: class 0 has TP 4, FP 1 -> 4/5; class 1 has TP 3, FN 1 -> 3/4
    assert s["miou"].item() == pytest.approx((4 / 5 + 3 / 4) / 2)
    per_image = [segmentation_scores(_confusion([p], [t], num_classes=2))["miou"].item() for p, t in ((p1, t1), (p2, t2))]
    assert np.mean(per_image) != pytest.approx(s["miou"].item())


def test_window_starts_cover_the_image() -> None:
    assert _window_starts(180, 64, 42) == [0, 42, 84, 116]
    assert _window_starts(40, 64, 42) == [0]
    for length, window, stride in ((180, 64, 42), (240, 96, 96), (97, 32, 5)):
        starts = _window_starts(length, window, stride)
        covered = set().union(*(range(s, min(s + window, length)) for s in starts))
        assert covered == set(range(length))


# --- heads ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_backbones("*_test"))
def test_every_head_on_every_family(name: str) -> None:
    task = SegmentationTask(backbone=create_backbone(name), num_classes=5, head_kwargs={"channels": 16})
    info = task.backbone.feature_info
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = task.backbone(x)
        assert len(features) == len(info) >= 2
        for kind in SEGMENTATION_HEADS:
            head = build_segmentation_head(kind, feature_info=info, num_classes=5, channels=16).eval()
            assert head(features).shape == (2, 5, 64 // info.strides[0], 64 // info.strides[0])
        task.eval()
        assert task(x).shape == (2, 5, 64, 64)
        assert task.head.aux(features).shape == (2, 5, 4, 4)


def test_whole_image_inference_pads_to_the_input_multiple() -> None:
    task = SegmentationTask(backbone=create_backbone("convnext_test"), num_classes=4, head="mlp").eval()
    with torch.no_grad():
        assert task(torch.randn(1, 3, 90, 120)).shape == (1, 4, 90, 120)


def test_slide_inference() -> None:
    torch.manual_seed(0)
    whole = SegmentationTask(backbone=create_backbone("convnext_test"), num_classes=4, head="semantic_fpn").eval()
    slide = SegmentationTask(backbone=create_backbone("convnext_test"), num_classes=4, head="semantic_fpn",
                             inference="slide", window=64).eval()
    slide.load_state_dict(whole.state_dict())
    assert slide.stride == 42
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(slide(x), whole(x))  # one window: the same computation
        assert slide(torch.randn(1, 3, 80, 120)).shape == (1, 4, 80, 120)


def test_bad_head_and_inference_options() -> None:
    b = create_backbone("convnext_test")
    with pytest.raises(ValueError, match=r"unknown segmentation head 'fcn'; choose one of \('upernet'"):
        SegmentationTask(backbone=b, num_classes=3, head="fcn")
    with pytest.raises(ValueError, match="inference must be one of"):
        SegmentationTask(backbone=b, num_classes=3, inference="tiles")
    with pytest.raises(ValueError, match="needs window"):
        SegmentationTask(backbone=b, num_classes=3, inference="slide")
    with pytest.raises(ValueError, match="built for 64x64"):
        SegmentationTask(backbone=create_backbone("maxvit_test"), num_classes=3, inference="slide", window=96)
    with pytest.raises(ValueError, match="aux_stride=8 is not a level's stride"):
        build_segmentation_head("upernet", feature_info=b.feature_info.select([2, 3]), num_classes=3, aux_stride=8)


# --- runs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", SEGMENTATION_HEADS)
def test_fast_dev_run_per_head(make_cfg, tmp_path: Path, head: str) -> None:
    cfg = make_cfg("backbone=convnext_test", "task=segmentation", f"task.head={head}", "trainer.fast_dev_run=true")
    rec = train(cfg, tmp_path)
    assert rec["task"] == "segmentation" and rec["head"] == head and rec["primary_metric"] == "miou"
    m = rec["metrics"]
    assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["pixel_acc"] <= 1.0
    ious = {k: v for k, v in m.items() if k.startswith("iou_")}
    assert ious and set(ious) <= {f"iou_{c}" for c in ("background", "circle", "triangle", "square", "star",
                                                         "cross", "ring")}
    assert m["miou"] == pytest.approx(np.mean(list(ious.values())), abs=1e-6)


def test_frozen_mode_trains_only_head_and_pyramid(make_cfg, tmp_path: Path) -> None:
    from arena.run import build_run

    cfg = make_cfg("backbone=vit_test", "task=segmentation", "task.mode=frozen", "task.head=mlp",
                   "trainer.fast_dev_run=true")
    run = build_run(cfg, tmp_path)
    inner = {k: v.clone() for k, v in run.module.backbone.inner.state_dict().items()}
    pyramid = {k: v.clone() for k, v in run.module.backbone.scales.state_dict().items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert all(torch.equal(v, run.module.backbone.inner.state_dict()[k]) for k, v in inner.items())
    assert any(not torch.equal(v, run.module.backbone.scales.state_dict()[k]) for k, v in pyramid.items())


# --- data ----------------------------------------------------------------------------------------------------

def _write_pair(images: Path, masks: Path, stem: str, size: tuple[int, int], rng: np.random.Generator,
                values: tuple[int, ...] = (0, 1, 2, 255), mask_size: tuple[int, int] | None = None) -> None:
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.png")
    mh, mw = mask_size or size
    Image.fromarray(rng.choice(np.array(values, dtype=np.uint8), (mh, mw))).save(masks / f"{stem}.png")


def _write_folders(root: Path, sizes=((40, 48), (36, 52))) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for i, size in enumerate(sizes):
            _write_pair(root / split, root / f"{split}annot", f"{split}_{i}", size, rng)
    return root


def _folders(root: Path, **kw) -> MaskFolderDataModule:
    kw = {"class_names": CLASSES, "image_size": 32, "base_size": (40, 48), "batch_size": 2, **kw}
    return MaskFolderDataModule(task="segmentation", root=str(root), **kw)


def test_folder_layout(tmp_path: Path) -> None:
    dm = _folders(_write_folders(tmp_path))
    assert dm.num_classes == 3 and dm.image_size == (32, 32)
    image, mask = dm.make_dataset("train")[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
    val = dm.make_dataset("val")
    assert [tuple(val[i][1].shape) for i in range(2)] == [(40, 48), (36, 52)]  # evaluation at native size
    raw = np.asarray(Image.open(tmp_path / "valannot" / "val_0.png"), dtype=np.int64)
    assert torch.equal(val[0][1], torch.from_numpy(raw))
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 40, 52) and y.shape == (2, 40, 52)
    assert (y[0, :, 48:] == 255).all() and (y[1, 36:] == 255).all()


def test_custom_split_folders_and_ignore_value(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        _write_pair(tmp_path / "images" / split, tmp_path / "annotations" / split, "a", (32, 32), rng, (0, 1, 2, 3))
    splits = {s: {"images": f"images/{d}", "masks": f"annotations/{d}"}
              for s, d in (("train", "training"), ("val", "validation"), ("test", "validation"))}
    dm = _folders(tmp_path, splits=splits, ignore_index=3)
    assert set(dm.make_dataset("test")[0][1].unique().tolist()) <= {0, 1, 2, 3}
    assert PadCollate(ignore_index=3)([dm.make_dataset("train")[0]])[1].shape == (1, 32, 32)


def test_voc_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i in ("2007_000001", "2007_000002"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "JPEGImages" / f"{i}.jpg")
        indices = rng.choice(np.array([0, 15, 20, 255], dtype=np.uint8), (30, 40))
        palette = Image.fromarray(indices, mode="P")
        palette.putpalette(list(rng.integers(0, 255, 768, dtype=np.uint8)))  # the colours are not the classes
        palette.save(tmp_path / "SegmentationClass" / f"{i}.png")
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    dm = VOCSegmentationDataModule(task="segmentation", root=str(tmp_path), image_size=32, base_size=(30, 40))
    assert dm.num_classes == 21 and dm.class_names[15] == "person"
    _, mask = dm.make_dataset("test")[0]
    expected = np.asarray(Image.open(tmp_path / "SegmentationClass" / "2007_000002.png"), dtype=np.int64)
    assert torch.equal(mask, torch.from_numpy(expected)) and set(mask.unique().tolist()) <= {0, 15, 20, 255}
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000009\n")
    with pytest.raises(FileNotFoundError, match="val.txt lists '2007_000009' but its image"):
        dm.make_dataset("val")


# --- bad input -----------------------------------------------------------------------------------------------

def test_mask_of_another_size_is_named(tmp_path: Path) -> None:
    root = _write_folders(tmp_path)
    _write_pair(root / "val", root / "valannot", "val_0", (40, 48), np.random.default_rng(3), mask_size=(20, 24))
    with pytest.raises(ValueError, match=r"mask .*valannot/val_0.png is 24x20 but its image .*val_0.png is 48x40"):
        _folders(root).make_dataset("val")[0]


def test_mask_value_outside_the_classes_is_named(tmp_path: Path) -> None:
    root = _write_folders(tmp_path)
    _write_pair(root / "test", root / "testannot", "test_1", (36, 52), np.random.default_rng(4), (0, 1, 7))
    with pytest.raises(ValueError, match=r"testannot/test_1.png holds values \[7\] outside the classes 0..2; "
                                         r"the only other accepted value is ignore_index=255"):
        _folders(root).make_dataset("test")[1]


def test_image_without_mask_is_named(tmp_path: Path) -> None:
    root = _write_folders(tmp_path)
    (root / "trainannot" / "train_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images have no mask in .*trainannot.*train_1.png"):
        _folders(root).make_dataset("train")


def test_colour_mask_and_bad_ignore_index(tmp_path: Path) -> None:
    root = _write_folders(tmp_path)
    Image.new("RGB", (48, 40)).save(root / "valannot" / "val_0.png")
    with pytest.raises(ValueError, match=r"val_0.png has mode RGB; expected a single-channel index PNG"):
        _folders(root).make_dataset("val")[0]
    with pytest.raises(ValueError, match="ignore_index=1 is the index of class 'road'"):
        _folders(root, ignore_index=1)


def test_folder_run_eval_and_pictures(make_cfg, tmp_path: Path) -> None:
    root = _write_folders(tmp_path / "data")
    overrides = ["backbone=convnext_test", "task=segmentation", "task.head=mlp", "data=masks", f"data.root={root}",
                 f"data.class_names=[{','.join(CLASSES)}]", "data.image_size=32", "data.base_size=[40,48]",
                 "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=1"]
    run_dir = tmp_path / "run"
    rec = train(make_cfg(*overrides, run_dir=run_dir), run_dir, overrides=overrides + ["trainer.accelerator=cpu"])
    assert rec["dataset"] == "data" and rec["checkpoint"]
    eval_dir = tmp_path / "eval"
    erec = evaluate(make_cfg(f"ckpt_path={rec['checkpoint']}", "save_images=3", config="eval", run_dir=eval_dir),
                    str(eval_dir))
    assert erec["metrics"]["miou"] == pytest.approx(rec["metrics"]["miou"], abs=1e-6)
    pictures = sorted((eval_dir / "pictures").glob("*.png"))
    assert len(pictures) == 2  # the test split holds two images
    with Image.open(pictures[0]) as im:
        assert im.size == (3 * 48, 40)  # image | truth | prediction, at the native size
    assert read_record(eval_dir)["stage"] == "eval"


@pytest.mark.skipif(not (DATASETS / "camvid-240").is_dir(), reason="shared datasets folder absent")
def test_camvid_end_to_end(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "task=segmentation", "data=camvid",
                   f"paths.datasets_dir={DATASETS.resolve()}", "data.num_workers=0", "data.batch_size=4",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                   "trainer.limit_test_batches=2")
    rec = train(cfg, tmp_path)
    assert rec["dataset"] == "camvid" and 0.0 <= rec["metrics"]["miou"] <= 1.0
    assert set(rec["metrics"]) - {"loss", "miou", "pixel_acc"} <= {f"iou_{c}" for c in cfg.data.class_names}
