"""The battle: backbones x tasks x seeds as one Hydra multirun, safe to kill and re-run.

    python train.py -m experiment=battle                      # the default grid, one cell after another
    python train.py -m experiment=battle hydra/launcher=slurm # one SLURM job per cell
    arena leaderboard outputs/battles/default                 # (also written when the grid ends)

Every cell of a multirun goes through ``run_cell``: a cell whose record is complete with the
same config hash is skipped; a cell killed mid-training resumes from its ``last.ckpt`` when that
checkpoint was made by the same config; any exception is caught and written as a ``failed``
record carrying the exception text, so one bad cell never stops the others. ``experiment=battle``
puts each cell in a deterministic directory, ``<battle dir>/<task>/<data>/<mode>/<backbone>/seed<k>``,
which is how a re-run finds it. ``BattleCallback`` prints the tally and writes the leaderboard
into ``<battle dir>/leaderboard`` when the multirun ends.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from .records import RECORD_NAME, config_hash, find_records, make_record, read_record, write_record

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TrainFn = Callable[[DictConfig, Path, list[str]], dict[str, Any]]
BENCH_NAME = "bench.csv"  # the battle's efficiency measurements, beside its cells


def existing_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The cell's record, or ``None`` when there is none or it cannot be read (treated as not run)."""
    try:
        return read_record(Path(run_dir) / RECORD_NAME)
    except (OSError, ValueError):
        return None


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


def run_cell(cfg: DictConfig, run_dir: str | Path, overrides: list[str], train_fn: TrainFn) -> dict[str, Any]:
    """Run one cell unless it is already done; returns its record (complete, skipped or failed).

    Skips a cell whose record is complete with the same config hash; resumes from a checkpoint of
    the same config; otherwise trains from scratch. An exception becomes a ``failed`` record.
    """
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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .leaderboard import build_leaderboard, write_leaderboard

        root = Path(config.hydra.sweep.dir)
        records = list(find_records(root))
        counts = Counter(r["status"] for r in records)
        log.info("battle %s: %d complete, %d failed", root, counts["complete"], counts["failed"])
        if counts["complete"]:
            bench = self.bench(root, sorted({r["backbone"] for r in records if r["status"] == "complete"}))
            board = build_leaderboard(records, bench)
            for path in write_leaderboard(board, root / self.out_subdir):
                log.info("wrote %s", path)
