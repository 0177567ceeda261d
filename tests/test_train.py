"""The Hydra + Lightning loop: composing every config, fast_dev_run, eval, records, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from arena.records import REQUIRED_KEYS, RECORD_NAME, config_hash, read_record
from eval import evaluate
from train import train


def _write_imagefolder(root: Path, classes=("a", "b", "c"), per_class: int = 4, size: int = 32) -> Path:
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                colour = tuple(int(v) for v in torch.randint(0, 255, (3,)))
                Image.new("RGB", (size, size), colour).save(d / f"{k}.png")
    return root


@pytest.mark.parametrize("mode", ["fine_tune", "linear_probe"])
def test_fast_dev_run_classification_shapes(make_cfg, tmp_path: Path, mode: str) -> None:
    cfg = make_cfg("backbone=convnext_test", f"task.mode={mode}", "trainer.fast_dev_run=true")
    rec = train(cfg, tmp_path)
    assert rec["status"] == "complete" and rec["mode"] == mode
    assert 0.0 <= rec["metrics"]["acc1"] <= 1.0
    assert rec["params"] > 0 and rec["flops"] > 0
    assert read_record(tmp_path) == json.loads((tmp_path / RECORD_NAME).read_text())


def test_linear_probe_freezes_backbone(make_cfg, tmp_path: Path) -> None:
    from arena.run import build_run

    cfg = make_cfg("backbone=convnext_test", "task.mode=linear_probe", "trainer.max_epochs=1")
    run = build_run(cfg, tmp_path)
    before = {k: v.clone() for k, v in run.backbone.state_dict().items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    after = run.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone (incl. BN stats) changed"
    assert not run.backbone.training


def test_imagefolder_run_and_eval_reproduces_test_metric(make_cfg, tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path / "data")
    train_dir = tmp_path / "run"
    cfg = make_cfg("backbone=convnext_test", "data=imagefolder", f"data.root={root}", "data.image_size=32",
                   "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=2", run_dir=train_dir)
    rec = train(cfg, train_dir, overrides=["backbone=convnext_test", "data=imagefolder", f"data.root={root}",
                                           "data.image_size=32", "data.num_workers=0", "data.batch_size=4",
                                           "logger=csv", "trainer.accelerator=cpu"])
    assert rec["dataset"] == "data" and rec["checkpoint"]  # the root folder's name
    eval_dir = tmp_path / "eval"
    ecfg = make_cfg(f"ckpt_path={rec['checkpoint']}", config="eval", run_dir=eval_dir)
    erec = evaluate(ecfg, str(eval_dir))
    assert erec["stage"] == "eval" and erec["backbone"] == "convnext_test"
    assert erec["metrics"]["acc1"] == pytest.approx(rec["metrics"]["acc1"], abs=1e-6)
    assert erec["metrics"]["loss"] == pytest.approx(rec["metrics"]["loss"], rel=1e-4)


def test_resume_from_last_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "trainer.max_epochs=1")
    train(cfg, tmp_path)
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    cfg = make_cfg("backbone=convnext_test", "trainer.max_epochs=2", "ckpt_path=last")
    rec = train(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert rec["status"] == "complete"
    assert first > 0 and ckpt["global_step"] == 2 * first  # the second epoch ran on top of the first


def test_record_schema_and_hash(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "trainer.fast_dev_run=true")
    rec = train(cfg, tmp_path)
    assert set(REQUIRED_KEYS) <= set(rec)
    assert rec["config_hash"] == config_hash(cfg)
    assert {"torch", "timm", "lightning"} <= set(rec["versions"])
    other = make_cfg("backbone=convnext_test", "trainer.fast_dev_run=true", "seed=1")
    assert config_hash(other) != rec["config_hash"]
    same = make_cfg("backbone=convnext_test", "trainer.fast_dev_run=true", "data.num_workers=3")
    assert config_hash(same) == rec["config_hash"]


def test_wandb_logger_offline(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg("backbone=convnext_test", "logger=wandb", "trainer.max_epochs=1",  # fast_dev_run mutes loggers
                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    train(cfg, tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / RECORD_NAME).exists()


def test_bf16_precision_on_cpu(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "trainer.precision=bf16-mixed", "trainer.fast_dev_run=true",
                   "trainer.accumulate_grad_batches=2")
    assert train(cfg, tmp_path)["status"] == "complete"


# --- bad input: one clear error, nothing written -------------------------------------------------------------

def test_unknown_config_options_fail_at_composition(make_cfg) -> None:
    for bad in ("task=classfication", "data=shape", "backbone=convnxt_tiny"):
        with pytest.raises(ConfigCompositionException):
            make_cfg(bad)


def test_cli_unknown_backbone_names_close_matches() -> None:
    from arena.config import check_backbone_override

    with pytest.raises(SystemExit, match="closest registered names: convnext_tiny"):
        check_backbone_override(["backbone=convnxt_tiny"])
    with pytest.raises(SystemExit, match="timm/resnet50"):
        check_backbone_override(["backbone=timm/resnet5"])
    check_backbone_override(["backbone=convnext_test,maxvit_test", "backbone.pretrained=null"])


def test_missing_or_wrong_data_folder(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "data=imagefolder", f"data.root={tmp_path / 'nope'}")
    with pytest.raises(Exception, match="does not exist; expected the layout"):
        train(cfg, tmp_path / "run")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    cfg = make_cfg("backbone=convnext_test", "data=imagefolder", f"data.root={tmp_path / 'flat'}")
    with pytest.raises(Exception, match="expected the layout"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / RECORD_NAME).exists()


def test_corrupt_image_is_named(make_cfg, tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path / "data", per_class=2)
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    cfg = make_cfg("backbone=convnext_test", "data=imagefolder", f"data.root={root}", "data.image_size=32",
                   "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=1")
    with pytest.raises(Exception, match="broken.jpg"):
        train(cfg, tmp_path / "run")


def test_num_classes_disagreeing_with_data(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "task.num_classes=10")
    with pytest.raises(ValueError, match="task.num_classes=10 but data 'shapes' has 6 classes"):
        train(cfg, tmp_path)


def test_resolution_the_backbone_cannot_take(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "data.image_size=50")
    with pytest.raises(ValueError, match="divisible by 32"):
        train(cfg, tmp_path)
    assert not any(tmp_path.rglob("*.ckpt"))


def test_failing_run_keeps_existing_record(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test", "trainer.fast_dev_run=true")
    train(cfg, tmp_path)
    before = (tmp_path / RECORD_NAME).read_text()
    bad = make_cfg("backbone=convnext_test", "task.num_classes=3")
    with pytest.raises(ValueError):
        train(bad, tmp_path)
    assert (tmp_path / RECORD_NAME).read_text() == before
