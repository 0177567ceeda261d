"""The battle: skip / resume / redo logic, failure isolation, a real multirun grid, the configs."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import train as train_script
from arena.battle import LOCK_NAME, BattleLock, check_battle_name, resumable_checkpoint, run_cell
from arena.records import RECORD_NAME, config_hash, make_record, read_record, scan_records, write_record
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
    for cell, text in (("b", '{"status": "compl'), ("c", "null"), ("d", "42")):  # torn or not a record: redone
        (tmp_path / cell).mkdir()
        (tmp_path / cell / RECORD_NAME).write_text(text)
        run_cell(make_cfg("backbone=convnext_test"), tmp_path / cell, [], fake)
        assert read_record(tmp_path / cell)["status"] == "complete"
    assert len(fake.ran) == 5


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


def _multirun(log_dir: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    """``python train.py -m experiment=battle_test ...`` in this process (``overrides`` replace the default grid)."""
    grid = overrides or ("backbone=convnext_test", "task=classification", "seed=0,1,2")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", f"--config-path={ROOT / 'conf'}", "experiment=battle_test",
                                      "logger=csv", f"paths.log_dir={log_dir}", "trainer.accelerator=cpu", *grid])
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
    assert board.loc[0, "entry"] == "convnext_test" and board.loc[0, "infer_samples_per_sec"] > 0

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
    tasks = params.task.split(",")
    for task in tasks:
        assert (ROOT / "conf" / "task" / f"{task}.yaml").exists(), task
    # BoB's five task types: OOD comes from the classification cells' extra test sets
    assert set(tasks) == {"classification", "detection", "segmentation", "retrieval"}
    assert list(cfg.data.ood_tests) == ["sketch"]
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
           "trainer.accelerator=cpu", "hydra.callbacks.battle.bench_sizes=[]"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    battle = tmp_path / "battles" / "test"
    records = [read_record(battle / "classification" / "shapes" / "fine_tune" / "convnext_test" / f"seed{s}")
               for s in (0, 1)]
    assert [r["status"] for r in records] == ["complete", "complete"] and records[0]["seed"] == 0
    assert len(list((battle / ".submitit").glob("*/*_result.pkl"))) == 2  # two submitit jobs ran them
    assert (battle / "leaderboard" / "leaderboard.csv").stat().st_size > 0


def _hold_lock(battle: Path, pid: int, host: str | None = None) -> None:
    battle.mkdir(parents=True, exist_ok=True)
    (battle / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": "2026-11-30T10:00:00+00:00",
                                                "command": "train.py -m experiment=battle"}))


def test_battle_directory_is_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    lock = BattleLock(tmp_path)
    lock.acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()

    battle = tmp_path / "battles" / "test"
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    _hold_lock(battle, gone.pid)  # the battle that held it was killed: a stale lock
    with caplog.at_level(logging.WARNING, logger="arena.battle"):
        lock = BattleLock(battle)
        lock.acquire()
    assert f"taking over the stale battle lock {battle / LOCK_NAME} (pid {gone.pid}" in caplog.text
    assert json.loads((battle / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()

    _hold_lock(battle, os.getppid())  # a live process on this host: a battle runs there
    with pytest.raises(RuntimeError, match=rf"another battle runs in .*pid {os.getppid()} on host"):
        BattleLock(battle).acquire()
    with pytest.raises(SystemExit, match="battle not started: another battle runs in"):
        _multirun(tmp_path, monkeypatch, "backbone=convnext_test", "task=classification")
    assert not list(battle.rglob(RECORD_NAME)) and json.loads((battle / LOCK_NAME).read_text())["pid"] == os.getppid()
    _hold_lock(battle, os.getppid(), host="elsewhere")  # another host's pid cannot be checked: refused too
    with pytest.raises(RuntimeError, match="on host elsewhere"):
        BattleLock(battle).acquire()


def test_battle_name_and_cells_cannot_leave_the_battle_directory(make_cfg, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("../x", "..", "a/b", ".hidden", "", "x y"):
        with pytest.raises(ValueError, match="is not a plain folder name"):
            check_battle_name(bad)
    assert check_battle_name("seeds3.v2-x_1") == "seeds3.v2-x_1"
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit, match=r"battle.name='../x' is not a plain folder name"):
        _multirun(logs, monkeypatch, "battle.name=../x", "backbone=convnext_test", "task=classification")
    assert not (logs / "x").exists() and not list(tmp_path.rglob(RECORD_NAME))
    fake = FakeTrain()
    battle = tmp_path / "battle"
    with pytest.raises(ValueError, match="outside the battle directory"):
        run_cell(make_cfg("backbone=convnext_test"), battle / "classification" / ".." / ".." / "x", [], fake,
                 root=battle)
    assert fake.ran == [] and not (tmp_path / "x").exists()


def test_failed_cell_makes_the_battle_exit_non_zero_after_its_leaderboard(tmp_path: Path) -> None:
    """``experiment=battle`` on an ImageFolder: classification completes; detection, which an ImageFolder cannot
    serve, fails; the process exits 1 naming the failed cell, with the leaderboard written."""
    from test_train import _write_imagefolder

    root = _write_imagefolder(tmp_path / "flowers")
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=battle_test", "backbone=convnext_test",
           "task=classification,detection", "data=imagefolder", f"data.root={root}", "data.image_size=32",
           "data.num_workers=0", f"paths.log_dir={tmp_path / 'logs'}", "logger=csv", "trainer.accelerator=cpu",
           "hydra.callbacks.battle.bench_sizes=[]"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    battle = tmp_path / "logs" / "battles" / "test"
    records = {r["task"]: r for r in scan_records(battle).records}
    assert records["classification"]["status"] == "complete" and records["detection"]["status"] == "failed"
    first_line = records["detection"]["error"].splitlines()[0]
    assert f"cell {records['detection']['run_dir']} failed: {first_line}" in done.stderr
    assert "1 problem(s)" in done.stderr
    assert "convnext_test" in (battle / "leaderboard" / "leaderboard.csv").read_text()
    assert not (battle / LOCK_NAME).exists()


def _voc(root: Path) -> list[str]:
    from test_detection import _write_voc

    _write_voc(root)
    return ["data=voc", "task=detection", "data.scales=[1.0]", "data.batch_size=2"]


def _coco(root: Path) -> list[str]:
    from test_detection import _write_coco

    _write_coco(root)
    split = "{ann_file: ann.json, images: images}"
    return ["data=coco", "task=detection", f"data.train={split}", f"data.val={split}", "data.scales=[1.0]",
            "data.batch_size=2"]


def _masks(root: Path) -> list[str]:
    from test_segmentation import CLASSES, _write_folders

    _write_folders(root)
    return ["data=masks", "task=segmentation", "task.head=mlp", f"data.class_names=[{','.join(CLASSES)}]",
            "data.base_size=[40,48]", "data.batch_size=2"]


@pytest.mark.parametrize("write", [_voc, _coco, _masks], ids=["voc", "coco", "masks"])
def test_battle_on_real_data_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write) -> None:
    data = write(tmp_path / "data")
    _multirun(tmp_path / "logs", monkeypatch, "backbone=convnext_test", "seed=0", f"data.root={tmp_path / 'data'}",
              "data.image_size=64", "data.num_workers=0", "hydra.callbacks.battle.bench_sizes=[]", *data)
    battle = tmp_path / "logs" / "battles" / "test"
    scan = scan_records(battle)
    assert not scan.unreadable and [r["status"] for r in scan.records] == ["complete"]
    assert Path(scan.records[0]["run_dir"]).resolve().is_relative_to(battle.resolve())
    board = pd.read_csv(battle / "leaderboard" / "leaderboard.csv")
    assert board["entry"].tolist() == ["convnext_test"] and board.loc[0, "coverage"] == "1/1"


def test_battle_killed_in_its_second_cell_resumes_that_cell(tmp_path: Path) -> None:
    """SIGKILL a real battle while its second cell trains, then re-run the command: the first cell is left as it
    was (its record, checkpoint and metric logs untouched) and the second resumes from its step checkpoint
    instead of starting again."""
    import signal
    import time

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=battle_test", "backbone=convnext_test",
           "task=classification", "seed=0,1", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
           "trainer.limit_train_batches=40", f"paths.log_dir={tmp_path}", "logger=csv", "trainer.accelerator=cpu",
           "callbacks.model_checkpoint.every_n_train_steps=2", "hydra.callbacks.battle.bench_sizes=[]"]
    battle = tmp_path / "battles" / "test" / "classification" / "shapes" / "fine_tune" / "convnext_test"
    first, second = battle / "seed0", battle / "seed1"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (second / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (first / RECORD_NAME).is_file() and not (second / RECORD_NAME).exists(), "not killed in the second cell"
    results = [first / RECORD_NAME, *(first / "checkpoints").iterdir(), *(first / "csv").iterdir()]
    untouched = {p: p.stat().st_mtime_ns for p in results}
    saved_step = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved_step < 40

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in results} == untouched  # its record, checkpoint and logs
    log = (second / "train.log").read_text()
    assert f"at global step {saved_step} " in log, log[-2000:]  # resumed, not restarted
    record = read_record(second)
    assert record["status"] == "complete"
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 40
