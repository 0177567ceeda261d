"""The battle: skip / resume / redo logic, failure isolation, a real multirun grid, the configs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import train as train_script
from arena.battle import resumable_checkpoint, run_cell
from arena.records import RECORD_NAME, config_hash, make_record, read_record, write_record
from backbones import FAMILIES, backbone_entry

ROOT = Path(__file__).resolve().parents[1]


class FakeTrain:
    """Stands in for ``train``: writes a complete record and remembers which cells ran."""

    def __init__(self, fail: str | None = None) -> None:
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
        self.ran.append(cfg.backbone.name)
        if cfg.backbone.name == self.fail:
            raise RuntimeError("boom: out of memory")
        record = make_record(stage="train", status="complete", cfg=cfg, family="baseline", metrics={"acc1": 0.5},
                             params=1, flops=1, wall_time_s=0.0, run_dir=run_dir, primary_metric="acc1",
                             resumed_from=cfg.get("ckpt_path"))
        write_record(run_dir, record)
        return record


def test_failing_cell_is_recorded_and_the_rest_run(make_cfg, tmp_path: Path) -> None:
    fake = FakeTrain(fail="mambaout_test")
    cells = {name: make_cfg(f"backbone={name}") for name in ("convnext_test", "mambaout_test", "vit_test")}
    records = {name: run_cell(cfg, tmp_path / name, [], fake) for name, cfg in cells.items()}
    assert fake.ran == ["convnext_test", "mambaout_test", "vit_test"]
    bad = read_record(tmp_path / "mambaout_test")
    assert bad == records["mambaout_test"]
    assert bad["status"] == "failed" and bad["error"] == "RuntimeError: boom: out of memory"
    assert "Traceback" in bad["traceback"] and bad["metrics"] == {}
    assert bad["family"] == backbone_entry("mambaout_test").family and bad["primary_metric"] == "acc1"
    assert bad["config_hash"] == config_hash(cells["mambaout_test"])
    assert records["vit_test"]["status"] == "complete"

    again = FakeTrain()
    for name, cfg in cells.items():
        run_cell(cfg, tmp_path / name, [], again)
    assert again.ran == ["mambaout_test"]  # only the failed cell is redone
    assert read_record(tmp_path / "mambaout_test")["status"] == "complete"


def test_changed_config_or_torn_record_is_redone(make_cfg, tmp_path: Path) -> None:
    fake = FakeTrain()
    run_cell(make_cfg("backbone=convnext_test"), tmp_path / "a", [], fake)
    run_cell(make_cfg("backbone=convnext_test", "trainer.max_epochs=5"), tmp_path / "a", [], fake)  # other hash
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / RECORD_NAME).write_text('{"status": "compl')  # a torn record is not a result
    run_cell(make_cfg("backbone=convnext_test"), tmp_path / "b", [], fake)
    assert len(fake.ran) == 3
    assert read_record(tmp_path / "b")["status"] == "complete"


def test_resume_only_from_a_checkpoint_of_the_same_config(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {}, "arena_config": OmegaConf.to_container(cfg, resolve=True)}, ckpt)
    assert resumable_checkpoint(tmp_path, config_hash(cfg)) == str(ckpt)
    assert resumable_checkpoint(tmp_path, config_hash(make_cfg("backbone=convnext_test", "seed=3"))) is None
    fake = FakeTrain()
    assert run_cell(cfg, tmp_path, [], fake)["resumed_from"] == str(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:20])  # killed while saving
    assert resumable_checkpoint(tmp_path, config_hash(cfg)) is None


def test_each_cell_is_its_own_wandb_run_in_the_battle_group(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for seed in (0, 1):
        cell = tmp_path / f"seed{seed}"
        cfg = make_cfg("experiment=battle", "logger=wandb", "backbone=convnext_test", "task=classification",
                       f"seed={seed}", "data.num_train=16", "data.num_val=16", "data.num_test=16",
                       "data.batch_size=16", "trainer.max_epochs=1", run_dir=cell)
        assert run_cell(cfg, cell, [], train_script.train)["status"] == "complete"
    runs = [list((tmp_path / f"seed{s}" / "wandb").glob("offline-run-*")) for s in (0, 1)]
    assert [len(r) for r in runs] == [1, 1]
    for r in runs:
        assert any(b"battle-default" in p.read_bytes() for p in r[0].glob("*.wandb"))  # the run's group


def _multirun(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python train.py -m experiment=battle_test ...`` in this process."""
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", f"--config-path={ROOT / 'conf'}", "experiment=battle_test", "logger=csv",
                                      f"paths.log_dir={log_dir}", "trainer.accelerator=cpu",
                                      "backbone=convnext_test", "task=classification", "seed=0,1,2"])
    GlobalHydra.instance().clear()
    try:
        train_script.main()
    finally:
        GlobalHydra.instance().clear()


def test_killed_battle_reruns_only_unfinished_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _multirun(tmp_path, monkeypatch)
    battle = tmp_path / "battles" / "test"
    cells = {s: battle / "classification" / "shapes" / "fine_tune" / "convnext_test" / f"seed{s}" for s in range(3)}
    first = {s: (d / RECORD_NAME).read_text() for s, d in cells.items()}
    assert all(json.loads(t)["status"] == "complete" for t in first.values())
    assert (battle / "leaderboard" / "leaderboard.html").stat().st_size > 0
    assert all((d / "checkpoints" / "last.ckpt").exists() for d in cells.values())
    bench = (battle / "bench.csv").read_text()  # the efficiency columns, measured once
    board = pd.read_csv(battle / "leaderboard" / "leaderboard.csv")
    assert board.loc[0, "backbone"] == "convnext_test" and board.loc[0, "infer_samples_per_sec"] > 0

    (cells[1] / RECORD_NAME).unlink()  # killed after its checkpoint, before its record
    failed = json.loads(first[2]) | {"status": "failed", "error": "RuntimeError: killed", "metrics": {}}
    write_record(cells[2], failed)
    _multirun(tmp_path, monkeypatch)

    assert (cells[0] / RECORD_NAME).read_text() == first[0]  # complete: not redone
    for s in (1, 2):
        redone = read_record(cells[s])
        assert redone["status"] == "complete" and redone["created"] >= json.loads(first[s])["created"]
        assert redone["config_hash"] == json.loads(first[s])["config_hash"]
        assert redone["metrics"]["acc1"] == pytest.approx(json.loads(first[s])["metrics"]["acc1"])
    assert not list(battle.rglob(".metrics.json.*"))  # no torn temporary files left
    assert (battle / "bench.csv").read_text() == bench  # reused, not re-measured


def test_battle_config_covers_every_family_and_existing_tasks(make_cfg) -> None:
    cfg = make_cfg("experiment=battle", "logger=wandb")
    params = cfg.hydra.sweeper.params
    backbones = params.backbone.split(",")
    assert {backbone_entry(b).family for b in backbones} == set(FAMILIES)
    assert all(not backbone_entry(b).tiny for b in backbones)
    for task in params.task.split(","):
        assert (ROOT / "conf" / "task" / f"{task}.yaml").exists(), task
    assert cfg.logger.wandb.group == "battle-default" and cfg.logger.wandb.offline
    assert cfg.hydra.sweep.dir == f"{cfg.paths.log_dir}/battles/default"
    assert cfg.hydra.sweep.subdir == f"classification/shapes/fine_tune/{cfg.backbone.name}/seed0"
    assert cfg.hydra.callbacks.battle._target_ == "arena.battle.BattleCallback"


def test_slurm_launcher_config_composes(make_cfg) -> None:
    from hydra.utils import get_class

    cfg = make_cfg("experiment=battle", "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min > 0
    assert OmegaConf.select(cfg, "hydra.launcher.name") == "arena-default"
    local = make_cfg("experiment=battle_test", "hydra/launcher=local").hydra.launcher
    assert get_class(local._target_).__name__ == "LocalLauncher"


def test_cells_run_as_separate_processes_through_submitits_local_launcher(tmp_path: Path) -> None:
    """The SLURM path without SLURM: each cell a submitit job, records and leaderboard as usual."""
    import subprocess

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=battle_test", "hydra/launcher=local",
           "backbone=convnext_test", "task=classification", "seed=0,1", f"paths.log_dir={tmp_path}", "logger=csv",
           "trainer.accelerator=cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    battle = tmp_path / "battles" / "test"
    records = [read_record(battle / "classification" / "shapes" / "fine_tune" / "convnext_test" / f"seed{s}")
               for s in (0, 1)]
    assert [r["status"] for r in records] == ["complete", "complete"] and records[0]["seed"] == 0
    assert len(list((battle / ".submitit").glob("*/*_result.pkl"))) == 2  # two submitit jobs ran them
    assert (battle / "leaderboard" / "leaderboard.csv").stat().st_size > 0
