"""Data identity and the up-front data checks: names, bad files found at setup before any step, masks, boxes."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from arena.config import resolve_data_config
from arena.data import VOCDetectionDataModule
from arena.data.base import check_name, dataset_name
from arena.data.det_transforms import read_image
from arena.data.imagefolder import load_rgb
from arena.records import RECORD_NAME
from arena.run import build_run
from backbones import create_backbone
from test_detection import _coco, _voc_xml, _write_coco, _write_voc
from test_segmentation import _write_pair
from test_train import _write_imagefolder

ROOT = Path(__file__).resolve().parents[1]

IMAGEFOLDER = ["backbone=convnext_test", "data=imagefolder", "data.num_workers=0", "data.batch_size=2"]


def _truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file short, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _noise(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    Image.effect_noise(size, 60).convert("RGB").save(path)
    return path


# --- identity -----------------------------------------------------------------------------------------------

def test_dataset_name_is_the_root_folder_made_path_safe() -> None:
    assert dataset_name("/data/hymenoptera/") == "hymenoptera"
    assert dataset_name("~/sets/my data (v2)") == "my-data-v2"
    assert dataset_name("/data/.cache") == "cache"
    with pytest.raises(ValueError, match="set data.name=<name>"):
        dataset_name("/")
    assert check_name("cifar10_small") == "cifar10_small"
    for bad in ("../../x", "a/b", ".hidden", "..", ""):
        with pytest.raises(ValueError, match=r"cannot name records and run directories.*e\.g\. data\.name="):
            check_name(bad)


def test_data_configs_name_their_dataset(make_cfg) -> None:
    assert make_cfg("data=imagefolder", "data.root=/x/hymenoptera").data.name == "hymenoptera"
    for fmt in ("imagefolder", "voc", "coco", "masks", "voc_seg"):
        assert OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / f"{fmt}.yaml"))["name"] == "${dataset_name:${.root}}"
    for named in ("cifar10_small", "bccd_voc", "camvid", "facemask_coco", "shapes"):
        assert OmegaConf.load(ROOT / "conf" / "data" / f"{named}.yaml").name == named
    cfg = make_cfg("data=masks", "data.root=/x/a", "data.class_names=[a,b]", "data.name=../../x")
    assert cfg.data.name == "../../x"  # refused when the data is built; the run directory is made safe first
    assert ".." not in cfg.hydra.run.dir and cfg.hydra.run.dir.endswith("_classification_x_fastvit_t8")


def test_unsafe_data_name_is_refused_before_anything_runs(make_cfg, tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path / "pets", per_class=1)
    cfg = make_cfg(*IMAGEFOLDER, f"data.root={root}", "data.image_size=32", "data.name=../../x")
    with pytest.raises(Exception, match=r"data.name='../../x' cannot name .* e\.g\. data\.name=x"):
        build_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_imagefolder_runs_at_the_backbones_own_size(make_cfg, tmp_path: Path) -> None:
    backbone = create_backbone("convnext_test")
    size = resolve_data_config(backbone)["input_size"]
    assert len(size) == 3 and all(isinstance(v, int) for v in size)  # timm's (C, H, W), not nested
    root = _write_imagefolder(tmp_path / "pets", per_class=1)
    cfg = make_cfg(*IMAGEFOLDER, f"data.root={root}", "trainer.fast_dev_run=true")  # image_size: null
    run = build_run(cfg, tmp_path / "run")
    assert run.datamodule.image_size == size[1:]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 1
    x, _ = next(iter(run.datamodule.train_dataloader()))
    assert tuple(x.shape[-2:]) == size[1:]


# --- images -------------------------------------------------------------------------------------------------

def test_truncated_jpeg_stops_the_run_before_the_first_step(make_cfg, tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path / "pets", per_class=2)
    _truncate(_noise(root / "val" / "b" / "cut.jpg"))
    (root / "train" / "a" / "notes.png").write_text("not an image")
    cfg = make_cfg(*IMAGEFOLDER, f"data.root={root}", "data.image_size=32", "trainer.max_epochs=1")
    run = build_run(cfg, tmp_path / "run")
    steps = []
    training_step = run.module.training_step
    run.module.training_step = lambda *a, **k: steps.append(1) or training_step(*a, **k)
    with pytest.raises(ValueError) as err:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    message = str(err.value)
    assert "data 'pets': 2 problems found before training" in message  # all problems in one report
    assert f"{root / 'val' / 'b' / 'cut.jpg'}: is a truncated JPEG" in message
    assert f"{root / 'train' / 'a' / 'notes.png'}: cannot be decoded" in message
    assert message.count("fix: re-save it") == 2
    assert steps == [] and run.trainer.global_step == 0
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / RECORD_NAME).exists()


def test_verify_modes(make_cfg, tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path / "pets", per_class=1)
    _truncate(_noise(root / "train" / "a" / "cut.bmp"), keep=0.8)  # a BMP's header is whole: only decoding finds it

    def setup(verify: str) -> None:
        build_run(make_cfg(*IMAGEFOLDER, f"data.root={root}", "data.image_size=32", f"data.verify={verify}"),
                  tmp_path / "run").datamodule.setup("fit")

    setup("header")
    setup("none")
    with pytest.raises(ValueError, match=r"cut\.bmp: cannot be decoded \(image file is truncated"):
        setup("full")
    with pytest.raises(Exception, match=r"data.verify='quick' is not one of \('header', 'full', 'none'\)"):
        setup("quick")


def test_16bit_images_are_scaled_not_saturated(tmp_path: Path) -> None:
    ramp = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pil = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert pil.shape == (40, 48, 3) and np.array_equal(pil[..., 0], (ramp >> 8).astype(np.uint8))
    tv = read_image(tmp_path / "deep.png")
    assert tv.dtype == torch.uint8 and torch.equal(tv[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))


# --- masks --------------------------------------------------------------------------------------------------

def _binary_masks(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        _write_pair(root / split, root / f"{split}annot", f"{split}_0", (32, 40), rng, values=(0, 255))
    return root


def test_0_255_masks_are_an_error_that_says_how_to_fix_them(make_cfg, tmp_path: Path) -> None:
    root = _binary_masks(tmp_path / "membranes")
    base = ["backbone=convnext_test", "task=segmentation", "task.head=mlp", "data=masks", f"data.root={root}",
            "data.class_names=[background,membrane]", "data.image_size=32", "data.base_size=[32,40]",
            "data.num_workers=0", "data.batch_size=2", "trainer.fast_dev_run=true"]
    run = build_run(make_cfg(*base), tmp_path / "run")
    with pytest.raises(ValueError, match=r"every mask holds only the values 0 and 255.*"
                                         r"data.mask_values='\{0: 0, 255: 1\}'"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 0
    run = build_run(make_cfg(*base, "data.mask_values={0: 0, 255: 1}"), tmp_path / "run")
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 1
    stored = np.asarray(Image.open(root / "valannot" / "val_0.png"))
    _, mask = run.datamodule.datasets["val"][0]
    assert set(mask.unique().tolist()) == {0, 1} and torch.equal(mask, torch.from_numpy(stored // 255).long())


def test_mask_values_outside_the_classes_are_listed_at_setup(make_cfg, tmp_path: Path) -> None:
    root = _binary_masks(tmp_path / "streets")
    _write_pair(root / "val", root / "valannot", "val_1", (32, 40), np.random.default_rng(1), values=(0, 1, 7))
    _write_pair(root / "test", root / "testannot", "test_1", (32, 40), np.random.default_rng(2), mask_size=(30, 40))
    run = build_run(make_cfg("backbone=convnext_test", "task=segmentation", "data=masks", f"data.root={root}",
                             "data.class_names=[a,b,c]", "data.image_size=32"), tmp_path / "run")
    with pytest.raises(ValueError) as err:
        run.datamodule.setup("fit")
    message = str(err.value)
    assert f"{root / 'valannot' / 'val_1.png'}: holds values [7] outside the classes 0..2" in message
    assert f"{root / 'testannot' / 'test_1.png'}: is 40x30 but its image test_1.png is 40x32" in message
    assert "2 problems" in message, message  # three classes: 0/255 masks are fine (255 is void) and not flagged


# --- COCO and boxes -----------------------------------------------------------------------------------------

def _edit_coco(path: Path, *, annotations: list[dict] = (), categories: list[dict] = ()) -> None:
    data = json.loads(path.read_text())
    data["annotations"] += list(annotations)
    data["categories"] += list(categories)
    path.write_text(json.dumps(data))


def test_unknown_coco_category_is_named_before_training(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path)
    _edit_coco(ann, annotations=[{"id": 9, "image_id": 11, "category_id": 5, "bbox": [1, 1, 8, 8], "iscrowd": 0},
                                 {"id": 10, "image_id": 99, "category_id": 0, "bbox": [1, 1, 8, 8], "iscrowd": 0}])
    with pytest.raises(ValueError) as err:
        _coco(tmp_path).setup("fit")
    message = str(err.value)
    assert (f"{ann} (annotation id 9): category_id 5 of 11.png is not in 'categories' (ids [0, 7]); "
            f"fix: add the category to 'categories' or remove the annotation") in message
    assert f"{ann} (annotation id 10): image_id 99 is not in 'images'" in message


def test_coco_category_without_annotations_is_reported_and_no_class(tmp_path: Path) -> None:
    _edit_coco(_write_coco(tmp_path), categories=[{"id": 3, "name": "person_parent"}])
    with pytest.warns(UserWarning, match=r"categories 3 \(person_parent\) have no annotations in any split"):
        dm = _coco(tmp_path)
    assert dm.class_names == ["cat", "dog"] and dm.category_ids == [0, 7]


def test_boxes_outside_the_image_are_clipped_or_dropped_and_counted(tmp_path: Path) -> None:
    _edit_coco(_write_coco(tmp_path, masks=False),  # images are 60x40
               annotations=[{"id": 20, "image_id": 12, "category_id": 0, "bbox": [50, 30, 20, 20], "iscrowd": 0},
                            {"id": 21, "image_id": 12, "category_id": 7, "bbox": [70, 5, 10, 10], "iscrowd": 0}])
    dm = _coco(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught]
    assert any("clipped 1 of 5 boxes that reach outside their image to its borders (in 12.png)" in m
               for m in messages), messages
    assert any("dropped the boxes that lie wholly outside their image, in 12.png (1)" in m for m in messages)
    _, target = dm.datasets["val"][2]  # image 12
    assert target["boxes"].tolist() == [[50.0, 30.0, 60.0, 40.0]] and target["labels"].tolist() == [1]


def test_voc_boxes_are_measured_against_the_image_read_at_setup(tmp_path: Path) -> None:
    root = _write_voc(tmp_path)  # 64x48 images; VOC corners are 1-based
    (root / "Annotations" / "c.xml").write_text(_voc_xml("c.jpg", [("WBC", (41, 31, 80, 60), 0)]))
    dm = VOCDetectionDataModule(task="detection", root=str(root), image_size=64, hflip=False, scales=[1.0])
    with pytest.warns(UserWarning, match=r"clipped 1 of 3 boxes that reach outside their image .*\(in c\.jpg\)"):
        dm.setup("fit")
    assert dm.datasets["test"][1][1]["boxes"].tolist() == [[40.0, 30.0, 64.0, 48.0]]
