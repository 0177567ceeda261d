"""Scale-out: 2-process DDP on CPU (gloo) through train.py, one record, test metrics counted once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from arena.records import RECORD_NAME, read_record
from arena.run import build_run, load_checkpoint
from arena.scaling import resolve_sync_batchnorm, runs_on_cpu
from backbones import list_backbones

ROOT = Path(__file__).resolve().parents[1]
# 7 test images in batches of 4 on 2 processes: a DistributedSampler would pad them to 8
SMALL = ["data.num_train=16", "data.num_val=8", "data.num_test=7", "data.batch_size=4", "trainer.max_epochs=1",
         "trainer.precision=32-true", "trainer.enable_progress_bar=false", "logger=csv"]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# classification and detection (whose metrics gather boxes across processes) in the default suite; every *_test
# backbone with every task, segmentation's confusion-matrix sum included, under -m slow (each case ~17 s on 2 cores)
DEFAULT = [("classification", "vim_test"), ("detection", "convnext_test")]
CROSS = [(t, b) for t in ("classification", "detection", "segmentation") for b in list_backbones("*_test")
         if (t, b) not in DEFAULT]


def _ddp_train(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "train.py", *overrides, *DDP_CPU, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert [p.parent for p in run_dir.rglob(RECORD_NAME)] == [run_dir], "one record per run"
    return read_record(run_dir)


def _check_ddp_run(make_cfg, tmp_path: Path, task: str, backbone: str) -> None:
    overrides = [f"backbone={backbone}", f"task={task}", *SMALL]
    rec = _ddp_train(tmp_path / "ddp", overrides)
    assert rec["status"] == "complete" and rec["task"] == task and rec["metrics"]
    # the same weights tested by one process over the same test set score the same
    cfg = make_cfg(*overrides, run_dir=tmp_path / "single")
    run = build_run(cfg, tmp_path / "single")
    run.module.load_state_dict(load_checkpoint(rec["checkpoint"])["state_dict"], strict=True)
    run.trainer.test(run.module, datamodule=run.datamodule)
    single = run.module.test_metrics()
    assert single.keys() == rec["metrics"].keys()
    assert single == pytest.approx(rec["metrics"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("task", "backbone"), DEFAULT)
def test_ddp_two_processes_on_cpu(make_cfg, tmp_path: Path, task: str, backbone: str) -> None:
    _check_ddp_run(make_cfg, tmp_path, task, backbone)


@pytest.mark.slow
@pytest.mark.parametrize(("task", "backbone"), CROSS)
def test_ddp_every_task_and_family(make_cfg, tmp_path: Path, task: str, backbone: str) -> None:
    _check_ddp_run(make_cfg, tmp_path, task, backbone)


def test_sync_batchnorm_is_turned_off_on_cpu_only() -> None:
    ddp = OmegaConf.create({"accelerator": "cpu", "sync_batchnorm": True, "devices": 2})
    assert runs_on_cpu(ddp) and resolve_sync_batchnorm(ddp).sync_batchnorm is False
    assert ddp.sync_batchnorm is True  # the composed config is left as it was
    gpu = OmegaConf.create({"accelerator": "gpu", "sync_batchnorm": True})
    assert resolve_sync_batchnorm(gpu).sync_batchnorm is True


def test_ema_run_records_and_checkpoints_the_averaged_weights(make_cfg, tmp_path: Path) -> None:
    from eval import evaluate
    from train import train

    overrides = ["backbone=resnet_test", *SMALL]
    raw = train(make_cfg(*overrides, run_dir=tmp_path / "raw"), tmp_path / "raw")
    overrides += ["callbacks=ema", "callbacks.ema.decay=0.5"]
    rec = train(make_cfg(*overrides, run_dir=tmp_path / "run"), tmp_path / "run", overrides=overrides)
    assert (raw["tested_weights"], rec["tested_weights"]) == ("final", "ema")
    assert rec["metrics"]["loss"] != pytest.approx(raw["metrics"]["loss"], rel=1e-4)  # same training, averaged
    assert "averaging_state" in load_checkpoint(rec["checkpoint"])
    # the recorded metrics are those of the averaged weights, which eval.py reads from the checkpoint
    erec = evaluate(make_cfg(f"ckpt_path={rec['checkpoint']}", config="eval", run_dir=tmp_path / "eval"),
                    str(tmp_path / "eval"))
    assert erec["tested_weights"] == "ema"
    assert erec["metrics"] == pytest.approx(rec["metrics"], rel=1e-5, abs=1e-7)


def test_multirun_cell_refuses_to_start_its_own_processes(make_cfg, tmp_path: Path) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    cfg = make_cfg("backbone=convnext_test", *DDP_CPU)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(ValueError, match="hydra/launcher=slurm"):
        build_run(cfg, tmp_path)
