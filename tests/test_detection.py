"""Detection: FPN plumbing on every family, each torchvision head in a run, COCO and VOC reading, COCO mAP."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from arena.data import CocoDetectionDataModule, VOCDetectionDataModule
from arena.data.base import detection_collate
from arena.data.det_transforms import detection_transforms, to_tv
from arena.data.shapes import ShapesDataset
from arena.run import build_run
from arena.tasks import DetectionTask
from backbones import SimpleFeaturePyramid, create_backbone, list_backbones
from eval import evaluate
from heads import BackboneWithFPN, build_detector
from train import train

DATASETS = Path(__file__).parents[1] / ".." / "shared" / "datasets"
TINY = ["backbone=convnext_test", "task=detection", "task.module.fpn_channels=64", "data.batch_size=2"]


# ----------------------------------------------------------------------------------------- neck
@pytest.mark.parametrize("name", list_backbones("*_test"))
def test_fpn_levels_channels_and_strides(name: str) -> None:
    backbone = create_backbone(name)
    x = torch.rand(1, 3, 64, 64)
    for extra, min_stride, names, strides in (("max_pool", 4, ["p2", "p3", "p4", "p5", "pool"], [4, 8, 16, 32, 64]),
                                              ("p6p7", 8, ["p3", "p4", "p5", "p6", "p7"], [8, 16, 32, 64, 128])):
        neck = BackboneWithFPN(backbone, out_channels=16, extra_blocks=extra, min_stride=min_stride)
        out = neck(x)
        assert list(out) == names and list(neck.strides) == strides and neck.out_channels == 16
        for (k, f), s in zip(out.items(), strides):
            assert f.shape == (1, 16, max(1, 64 // s), max(1, 64 // s)), (name, k, tuple(f.shape))
        single = len(backbone.feature_info) == 1
        assert isinstance(neck.body, SimpleFeaturePyramid) == single
        if not single:
            assert neck.body is backbone


def test_build_detector_rejects_bad_arguments() -> None:
    backbone = create_backbone("convnext_test")
    with pytest.raises(ValueError, match="faster_rcnn.*retinanet.*fcos"):
        build_detector("yolo", backbone=backbone, num_classes=3, image_size=64)
    with pytest.raises(ValueError, match="multiple of 32 and >= 64, got 48"):
        build_detector("fcos", backbone=backbone, num_classes=3, image_size=64, fpn_channels=48)
    with pytest.raises(ValueError, match="num_classes counts the background"):
        build_detector("retinanet", backbone=backbone, num_classes=1, image_size=64)


def test_fixed_size_backbone_gets_padded_batches() -> None:
    model = build_detector("faster_rcnn", backbone=create_backbone("maxvit_test"), num_classes=3, image_size=64,
                           fpn_channels=32).eval()
    out = model([torch.rand(3, 40, 64), torch.rand(3, 64, 30)])  # non-square: padded to the 64x64 it takes
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)


# ------------------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("head", ["faster_rcnn", "retinanet", "fcos", "mask_rcnn"])
def test_fast_dev_run_each_head(make_cfg, tmp_path: Path, head: str) -> None:
    rec = train(make_cfg(*TINY, f"task.head={head}", "trainer.fast_dev_run=true"), tmp_path)
    assert rec["status"] == "complete" and rec["task"] == "detection" and rec["head"] == head
    assert rec["primary_metric"] == "map"
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "mar_100"):
        assert -1.0 <= rec["metrics"][key] <= 1.0
    assert ("segm_map" in rec["metrics"]) == (head == "mask_rcnn")


def test_frozen_mode_trains_only_neck_and_head(make_cfg, tmp_path: Path) -> None:
    run = build_run(make_cfg(*TINY, "backbone=vit_test", "task.head=fcos", "task.mode=frozen",
                             "trainer.fast_dev_run=true"), tmp_path)
    inner = run.module.backbone.inner
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    fpn = {k: v.clone() for k, v in run.module.detector.backbone.fpn.state_dict().items()}
    pyramid = [p.clone() for p in run.module.backbone.scales.parameters()]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert all(torch.equal(before[k], v) for k, v in inner.state_dict().items())
    assert not inner.training
    assert any(not torch.equal(fpn[k], v) for k, v in run.module.detector.backbone.fpn.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(pyramid, run.module.backbone.scales.parameters()))


def test_eval_saves_pictures_of_predictions_and_truth(make_cfg, tmp_path: Path) -> None:
    over = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=1", "data.num_val=2", "data.num_test=4"]
    rec = train(make_cfg(*over, run_dir=tmp_path / "run"), tmp_path / "run", overrides=over)
    erec = evaluate(make_cfg(f"ckpt_path={rec['checkpoint']}", "save_images=3", config="eval",
                             run_dir=tmp_path / "eval"), str(tmp_path / "eval"))
    assert erec["metrics"]["map"] == pytest.approx(rec["metrics"]["map"], abs=1e-6)
    pictures = sorted((tmp_path / "eval" / "pictures").glob("*.png"))
    assert len(pictures) == 3
    image = np.asarray(Image.open(pictures[0]))
    assert image.shape == (512, 512, 3)  # the 64-pixel scene, enlarged so labels are readable
    green = (image[..., 1] > 200) & (image[..., 0] < 50) & (image[..., 2] < 50)
    assert green.sum() > 100  # truth boxes are drawn


# --------------------------------------------------------------------------------------- metrics
def _scenes(n: int = 4) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    ds = ShapesDataset(split="test", length=n, image_size=64, view="detection", mean=(0.5,) * 3, std=(0.5,) * 3)
    return [ds[i] for i in range(n)]


def _test_map(predict) -> dict[str, float]:
    task = DetectionTask(backbone=create_backbone("convnext_test"), num_classes=7, head="faster_rcnn",
                         image_size=64, fpn_channels=32)
    task.forward = predict
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    (metrics,) = trainer.test(task, dataloaders=torch.utils.data.DataLoader(_scenes(), batch_size=2,
                                                                          collate_fn=detection_collate),
                              verbose=False)
    return metrics


def test_map_is_one_for_perfect_boxes_and_lower_for_shifted() -> None:
    scenes = _scenes()

    def predictions(shift: float):
        def predict(images):
            out = []
            for image in images:
                target = next(t for im, t in scenes if torch.equal(im, image))
                wh = target["boxes"][:, 2:] - target["boxes"][:, :2]
                offset = torch.cat([wh, wh], 1) * shift
                out.append({"boxes": target["boxes"] + offset, "labels": target["labels"],
                            "scores": torch.ones(len(target["labels"]))})
            return out
        return predict

    perfect = _test_map(predictions(0.0))
    assert perfect["test/map"] == pytest.approx(1.0) and perfect["test/map_50"] == pytest.approx(1.0)
    per_class = {k: v for k, v in perfect.items() if k.startswith("test/map_per_class/")}
    assert per_class and all(v == pytest.approx(1.0) for v in per_class.values())
    shifted = _test_map(predictions(0.2))  # IoU of a box shifted by 20% of its size along x and y: 0.47
    assert shifted["test/map"] < 0.5 and shifted["test/map_50"] < 0.5 < perfect["test/map"]


# ------------------------------------------------------------------------------------------ COCO
def _polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _write_coco(root: Path, *, masks: bool = True, missing: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 60} for i in (10, 11, 12)]
    for im in images[: 2 if missing else 3]:
        Image.new("RGB", (60, 40), (90, 120, 30)).save(root / "images" / im["file_name"])
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((20, 10), (40, 10)))))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 10, "category_id": 0, "bbox": [5, 6, 20, 10], "iscrowd": 0,
         "segmentation": _polygon(5, 6, 20, 10)},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [40, 20, 10, 10], "iscrowd": 0, "segmentation": rle},
        {"id": 3, "image_id": 10, "category_id": 7, "bbox": [1, 1, 0, 5], "iscrowd": 0,
         "segmentation": _polygon(1, 1, 0, 5)},  # degenerate: zero width
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [0, 0, 30, 30], "iscrowd": 1,
         "segmentation": _polygon(0, 0, 30, 30)},
    ]  # image 12 has no objects
    if not masks:
        for a in anns:
            a["segmentation"] = []
    cats = [{"id": 7, "name": "dog"}, {"id": 0, "name": "cat"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _coco(root: Path, **kw) -> CocoDetectionDataModule:
    split = {"ann_file": "ann.json", "images": "images"}
    return CocoDetectionDataModule(task="detection", root=str(root), train=split, val=split, image_size=64,
                                   hflip=False, scales=[1.0], **kw)


def test_coco_maps_categories_reads_masks_and_drops_degenerate_boxes(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    dm = _coco(tmp_path)
    assert dm.class_names == ["cat", "dog"] and dm.category_ids == [0, 7] and dm.num_classes == 3 and dm.has_masks
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 boxes .*10\.png"):
        train_ds = dm.make_dataset("train")
    image, target = dm.make_dataset("val")[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["labels"].tolist() == [1, 2]  # category 0 -> 1 (cat), 7 -> 2 (dog)
    assert target["boxes"].tolist() == [[5, 6, 25, 16], [40, 20, 50, 30]]
    assert target["masks"].shape == (2, 40, 60) and target["masks"][1, 20:30, 40:50].all()
    assert int(target["masks"][1].sum()) == 100 and target["masks"][0, 8, 10] == 1  # RLE and polygon
    crowd = dm.make_dataset("val")[1][1]
    assert crowd["iscrowd"].tolist() == [True] and len(train_ds[1][1]["boxes"]) == 0  # crowds: metric only
    image, empty = train_ds[2]
    assert image.shape == (3, 42, 64)  # the longer side resized to image_size, aspect kept
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 42, 64)


def test_coco_bad_input_names_the_problem(tmp_path: Path) -> None:
    _write_coco(tmp_path / "a", missing=True)
    with pytest.raises(ValueError, match=r"image id 12 points to .*12\.png, which does not exist"):
        _coco(tmp_path / "a").setup()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetectionDataModule(task="detection", root=str(tmp_path), train={"ann_file": "nope.json", "images": "."},
                                val={"ann_file": "nope.json", "images": "."})
    with pytest.raises(ValueError, match=r"exactly \('ann_file', 'images'\)"):
        CocoDetectionDataModule(task="detection", root=str(tmp_path), train={"ann": "x"}, val={"ann": "x"})
    with pytest.raises(ValueError, match="serves the tasks"):
        CocoDetectionDataModule(task="segmentation", root=str(tmp_path), train={}, val={})


def test_mask_rcnn_on_data_without_masks_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    _write_coco(tmp_path / "data", masks=False)
    cfg = make_cfg(*TINY, "task.head=mask_rcnn", "data=coco", f"data.root={tmp_path / 'data'}",
                   "data.train={ann_file: ann.json, images: images}", "data.val={ann_file: ann.json, images: images}",
                   "data.image_size=64", "data.num_workers=0", "trainer.fast_dev_run=true")
    run = build_run(cfg, tmp_path)
    assert not run.datamodule.has_masks
    with pytest.raises(ValueError, match="mask_rcnn needs instance masks, but data has none"):
        run.trainer.fit(run.module, datamodule=run.datamodule)


# ------------------------------------------------------------------------------------------- VOC
def _voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return f"<annotation><filename>{filename}</filename>{body}</annotation>"


def _write_voc(root: Path) -> Path:
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    files = {"a": [("RBC", (1, 1, 20, 10), 0), ("WBC", (30, 5, 29, 20), 0), ("Platelets", (5, 5, 15, 15), 1)],
             "b": [], "c": [("WBC", (10, 10, 40, 30), 0)]}
    for i, objects in files.items():
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(_voc_xml(f"{i}.jpg", objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\nc\n")
    return root


def test_voc_reads_boxes_difficult_and_empty_images(tmp_path: Path) -> None:
    root = _write_voc(tmp_path)
    dm = VOCDetectionDataModule(task="detection", root=str(root), image_size=64, hflip=False, scales=[1.0])
    assert dm.class_names == ["Platelets", "RBC", "WBC"] and dm.num_classes == 4 and not dm.has_masks
    with pytest.warns(UserWarning, match=r"dropped 1 of 4 boxes .*a\.xml"):
        val = dm.make_dataset("val")  # falls back to the test list
    target = val[0][1]
    assert target["boxes"].tolist() == [[0, 0, 20, 10], [4, 4, 15, 15]]  # 1-based inclusive -> 0-based xyxy
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [False, True]
    with pytest.warns(UserWarning):
        train_ds = dm.make_dataset("train")
    assert train_ds[0][1]["labels"].tolist() == [2]  # difficult objects are not trained on
    assert train_ds[1][1]["boxes"].shape == (0, 4)
    ordered = VOCDetectionDataModule(task="detection", root=str(root), classes=["RBC", "WBC", "Platelets"])
    assert ordered.make_dataset("test")[1][1]["labels"].tolist() == [2]


def test_voc_bad_input_names_the_problem(tmp_path: Path) -> None:
    root = _write_voc(tmp_path)
    with pytest.raises(ValueError, match=r"classes \['Platelets', 'WBC'\] are not in data.classes \['RBC'\]"):
        VOCDetectionDataModule(task="detection", root=str(root), classes=["RBC"]).setup()
    (root / "JPEGImages" / "c.jpg").unlink()
    (root / "Annotations" / "b.xml").unlink()
    with pytest.raises(ValueError, match=r"(?s)2 problems.*b\.xml' does not exist.*c\.xml: points to the image .*c\.jpg"):
        VOCDetectionDataModule(task="detection", root=str(root)).setup()
    with pytest.raises(FileNotFoundError, match="expected root/JPEGImages/"):
        VOCDetectionDataModule(task="detection", root=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ transforms
def test_augmentation_moves_boxes_and_masks_with_the_image() -> None:
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, 10:20, 0:20] = 255
    masks = torch.zeros(1, 40, 80, dtype=torch.uint8)
    masks[0, 10:20, 0:20] = 1
    target = {"boxes": torch.tensor([[0.0, 10.0, 20.0, 20.0], [5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1, 2]),
              "masks": torch.cat([masks, masks])}
    torch.manual_seed(0)
    lefts = set()
    for _ in range(8):  # flip and scale are random
        out_image, out = detection_transforms(train=True, image_size=80, scales=(0.5, 1.0))(*to_tv(image, target))
        h, w = out_image.shape[-2:]
        assert w == 2 * h and w in (40, 80)  # longer side = image_size x scale, aspect kept
        assert out["labels"].tolist() == [1] and out["masks"].shape == (1, h, w)  # the zero-width box is dropped
        x0, y0, x1, y1 = out["boxes"][0].round().long().tolist()
        assert out["masks"][0, y0:y1, x0:x1].float().mean() > 0.9 and out_image[0, y0:y1, x0:x1].mean() > 0.9
        assert out["masks"][0].sum() == (x1 - x0) * (y1 - y0)
        lefts.add(x0 == 0)
    assert lefts == {True, False}  # both flipped and unflipped images were seen


# ------------------------------------------------------------------------------ real data (short)
@pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} is absent")
@pytest.mark.parametrize("data, classes, degenerate", [
    ("bccd_voc", ["RBC", "WBC", "Platelets"], True),  # two point boxes, one in train and one in val
    ("facemask_coco", ["mask_weared_incorrect", "with_mask", "without_mask"], False),  # category ids from 0
])
def test_real_datasets_train_and_evaluate(make_cfg, tmp_path: Path, data: str, classes: list[str],
                                          degenerate: bool) -> None:
    cfg = make_cfg(*TINY, f"data={data}", "data.image_size=128", "data.num_workers=0", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2",
                   f"paths.datasets_dir={DATASETS}")
    with pytest.warns(UserWarning, match=r"dropped 1 of \d+ boxes") if degenerate else contextlib.nullcontext():
        rec = train(cfg, tmp_path)
    assert rec["dataset"] == data and 0.0 <= rec["metrics"]["map"] <= 1.0
    named = {k.split("/", 1)[1] for k in rec["metrics"] if k.startswith("map_per_class/")}
    assert named and named <= set(classes)  # original category names, whatever their ids
