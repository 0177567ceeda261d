"""The battle: backbones x tasks x seeds as one Hydra multirun, safe to kill and re-run.

    python train.py -m experiment=battle                      # the default grid, one cell after another
    python train.py -m experiment=battle hydra/launcher=slurm # one SLURM job per cell
    arena leaderboard outputs/battles/default                 # (also written when the grid ends)

Every cell of a multirun goes through ``run_cell``: a cell whose record is complete with the
same config hash is skipped; a cell killed mid-training resumes from its ``last.ckpt`` when that
checkpoint was made by the same config; any exception is caught and written as a ``failed``
record carrying the exception text, so one bad cell never stops the others. ``experiment=battle``
puts each cell in a deterministic directory, ``<battle dir>/<task>/<data>/<mode>/<entry>/seed<k>``,
which is how a re-run finds it, and a cell directory outside the battle directory is refused.
``BattleCallback`` locks the battle directory while the multirun runs (``BattleLock``), then prints
the tally, lists unreadable records, writes the leaderboard into ``<battle dir>/leaderboard`` and
exits non-zero, naming them, when cells of this run failed.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import json
import logging
import os
import re
import socket
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from .records import (RECORD_NAME, RecordError, RecordScan, config_hash, make_record, read_record, scan_records,
                      write_record)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TrainFn = Callable[[DictConfig, Path, list[str]], dict[str, Any]]
BENCH_NAME = "bench.csv"  # the battle's efficiency measurements, beside its cells


def existing_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The cell's record, or ``None`` when there is none or it cannot be read (treated as not run)."""
    path = Path(run_dir) / RECORD_NAME
    if not path.exists():
        return None
    try:
        return read_record(path)
    except RecordError as e:
        log.warning("redoing the cell: %s", e)
        return None


def check_battle_name(name: str) -> str:
    """``battle.name`` is one plain folder name, so the battle directory stays inside the log directory."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
        raise ValueError(f"battle.name={name!r} is not a plain folder name; use letters, digits, '_', '.' and '-', "
                         f"starting with a letter or digit, e.g. battle.name=my_battle")
    return str(name)


def check_inside(run_dir: str | Path, root: str | Path) -> Path:
    """``run_dir`` resolved, when it lies inside ``root``; a ``ValueError`` naming both otherwise."""
    resolved, base = Path(run_dir).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise ValueError(f"cell directory {str(run_dir)!r} resolves to {str(resolved)!r}, outside the battle directory "
                         f"{str(base)!r}; a path component of the cell (data.name, task.name, backbone) holds '..' or "
                         f"'/': give it a plain name")
    return resolved


def resumable_checkpoint(run_dir: str | Path, want_hash: str) -> str | None:
    """``checkpoints/last.ckpt`` when it is readable and was written by a run of the same config."""
    from .run import load_checkpoint

    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    try:
        saved = load_checkpoint(path).get("arena_config")
    except (ValueError, FileNotFoundError) as e:
        log.warning("not resuming from %s: %s", path, e)
        return None
    return str(path) if saved and config_hash(saved) == want_hash else None


def _family(backbone: str) -> str:
    from backbones import Backbone, backbone_entry

    try:
        return backbone_entry(backbone).family
    except ValueError:  # timm/<name> or an unknown name: the class default, as create_backbone would give
        return Backbone.family


def _primary_metric(cfg: DictConfig) -> str:
    return getattr(get_class(cfg.task.module._target_), "primary_metric", "")


def failed_record(cfg: DictConfig, run_dir: str | Path, error: BaseException, started: float) -> dict[str, Any]:
    """The record of a cell that raised: what it was, and the exception text and traceback."""
    return make_record(stage="train", status="failed", cfg=cfg, family=_family(cfg.backbone.name), metrics={},
                       params=None, flops=None, wall_time_s=time.time() - started, run_dir=run_dir,
                       primary_metric=_primary_metric(cfg), error=f"{type(error).__name__}: {error}",
                       traceback="".join(traceback.format_exception(error)))


def finish_wandb() -> None:
    """End the active wandb run, if any: Lightning leaves it open, and the next cell in the same
    process would otherwise log into it instead of starting its own run in the battle's group."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run_cell(cfg: DictConfig, run_dir: str | Path, overrides: list[str], train_fn: TrainFn, *,
             root: str | Path | None = None) -> dict[str, Any]:
    """Run one cell unless it is already done; returns its record (complete, skipped or failed).

    Skips a cell whose record is complete with the same config hash; resumes from a checkpoint of
    the same config; otherwise trains from scratch. An exception becomes a ``failed`` record. With
    ``root`` (the battle directory), a cell directory outside it is refused before anything is written.
    """
    if root is not None:
        check_inside(run_dir, root)
    run_dir = Path(run_dir)
    want = config_hash(cfg)
    done = existing_record(run_dir)
    if done is not None and done["status"] == "complete" and done["config_hash"] == want:
        log.info("skipping %s: complete with config hash %s", run_dir, want)
        return done
    ckpt = resumable_checkpoint(run_dir, want)
    if ckpt is not None:
        log.info("resuming %s from %s", run_dir, ckpt)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.ckpt_path = ckpt
    started = time.time()
    try:
        return train_fn(cfg, run_dir, overrides)
    except Exception as e:  # the cell fails, the grid goes on
        log.error("cell %s failed: %s: %s", run_dir, type(e).__name__, e)
        record = failed_record(cfg, run_dir, e, started)
        write_record(run_dir, record)
        return record
    finally:
        finish_wandb()


LOCK_NAME = ".battle.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class BattleLock:
    """``<battle dir>/.battle.lock``: one battle at a time in a directory.

    The file holds the launching process's pid, host and start time, and is created atomically (written
    beside, then hard-linked into place, which fails if it exists). A lock whose pid is dead on this host
    is stale and taken over with a warning; one held by a live process, or by another host (which cannot
    be checked from here), stops the second battle with an error naming the holder. The launcher holds
    it, not the cells, so SLURM cells on other hosts run under it; it is released when the multirun ends
    or the launching process exits.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The lock's content, ``{}`` when it cannot be parsed, ``None`` when there is no lock."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> None:
        """Take the lock, or a stale one (warning); ``RuntimeError`` naming the holder when a battle runs."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK_NAME}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                self._take_over_if_stale(me)
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        if (self.holder() or {}).get("pid") != me["pid"]:  # another battle took the stale lock at the same time
            self._take_over_if_stale(me)
        self.held = True
        atexit.register(self.release)

    def _take_over_if_stale(self, me: dict[str, Any]) -> None:
        old = self.holder() or {}
        pid, host = old.get("pid"), old.get("host")
        ours = host == me["host"] and isinstance(pid, int)
        if ours and (pid == me["pid"] or not _pid_alive(pid)):
            why = "left by an earlier multirun of this process" if pid == me["pid"] else "is gone"
            log.warning("taking over the stale battle lock %s (pid %s on %s, started %s, %s)",
                        self.path, pid, host, old.get("started"), why)
            return
        who = f"pid {pid} on host {host}, started {old.get('started')}: {old.get('command')}" if old else "unreadable"
        raise RuntimeError(f"another battle runs in {self.path.parent} (lock {self.path}: {who}); wait for it, use "
                           f"another battle.name, or delete {self.path} if that battle is gone")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and (self.holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        atexit.unregister(self.release)


class BattleCallback(Callback):
    """At the end of a multirun: report complete/failed cells and write the leaderboard.

    With ``bench_sizes``, the battle's backbones are also measured by ``arena bench`` at those
    resolutions (``bench_settings``: ``BenchSettings`` fields) into ``<battle dir>/bench.csv``,
    which gives the leaderboard its throughput and memory columns and the scaling plot. A
    ``bench.csv`` that already covers every backbone and size is reused, so re-running a finished
    battle neither re-measures nor changes its numbers.
    """

    def __init__(self, out_subdir: str = "leaderboard", bench_sizes: Sequence[int] = (),
                 bench_settings: dict[str, Any] | None = None) -> None:
        self.out_subdir = out_subdir
        self.bench_sizes = [int(s) for s in bench_sizes]
        self.bench_settings = dict(bench_settings or {})
        self.lock: BattleLock | None = None
        self.started = ""

    def bench(self, root: Path, backbones: Sequence[str]) -> pd.DataFrame | None:
        """``arena bench`` rows of ``backbones`` at ``bench_sizes``, from ``root/bench.csv`` or measured into it."""
        import pandas as pd

        from .bench import BenchSettings, run_bench, write_bench_csv

        if not self.bench_sizes:
            return None
        path = root / BENCH_NAME
        want = {(b, s) for b in backbones for s in self.bench_sizes}
        if path.is_file():
            old = pd.read_csv(path)
            if want <= set(zip(old["model"], old["infer_img_size"])):
                log.info("reusing %s", path)
                return old
        log.info("benchmarking %d backbones at %s px", len(backbones), self.bench_sizes)
        bench = run_bench(sorted(backbones), self.bench_sizes, BenchSettings(**self.bench_settings))
        write_bench_csv(bench, path)
        return bench

    # Hydra turns a callback's Exception into a warning and goes on; SystemExit is what stops a multirun
    # (before its cells) or sets its exit status (after them).
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``battle.name`` and lock the battle directory before any cell runs."""
        try:
            check_battle_name(OmegaConf.select(config, "battle.name", default="default"))
            self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            self.lock = BattleLock(config.hydra.sweep.dir)
            self.lock.acquire()
        except (ValueError, RuntimeError) as e:
            raise SystemExit(f"battle not started: {e}") from e

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the leaderboard and release the lock; exit non-zero, naming them, when cells of this run failed
        or the leaderboard could not be written."""
        root = Path(config.hydra.sweep.dir)
        try:
            scan = scan_records(root)
            failed = [r for r in scan.records if r["status"] == "failed" and r["created"] >= self.started]
            problems = [f"cell {r.get('run_dir')} failed: {(r.get('error') or 'no error text').splitlines()[0]}"
                        for r in failed]
            try:
                self.publish(root, scan)
            except Exception as e:  # the tally and the exit status must still come out
                log.exception("leaderboard of %s not written", root)
                problems.append(f"leaderboard not written: {type(e).__name__}: {e}")
        finally:
            if self.lock is not None:
                self.lock.release()
        if problems:
            raise SystemExit(f"battle {root}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))

    def publish(self, root: Path, scan: RecordScan) -> None:
        """Log the tally and the unreadable records, write the leaderboard when any cell is complete."""
        from .leaderboard import build_leaderboard, write_leaderboard

        counts = Counter(r["status"] for r in scan.records)
        log.info("battle %s: %d complete, %d failed, %d unreadable records", root, counts["complete"],
                 counts["failed"], len(scan.unreadable))
        for path, reason in scan.unreadable:
            log.warning("unreadable record %s: %s", path, reason)
        if counts["complete"]:
            bench = self.bench(root, sorted({r["backbone"] for r in scan.records if r["status"] == "complete"}))
            board = build_leaderboard(scan.records, bench, unreadable=scan.unreadable)
            for path in write_leaderboard(board, root / self.out_subdir):
                log.info("wrote %s", path)
