"""The run record: one ``metrics.json`` per run directory, the only thing leaderboards read.

Records are written atomically (temporary file in the same directory, then ``os.replace``), so
a killed run never leaves a half-written record and an existing record is only ever replaced
whole. The config hash identifies what a run computed (backbone, task, data, trainer, seed), not
where or how it was launched, so a battle can tell which of its cells are already done.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

RECORD_NAME = "metrics.json"
SCHEMA_VERSION = 1
STATUSES = ("complete", "failed")
REQUIRED_KEYS = ("schema_version", "status", "stage", "backbone", "family", "task", "mode", "dataset", "seed",
                 "primary_metric",
                 "config_hash", "metrics", "params", "flops", "wall_time_s", "versions", "created")
# what records written before entries existed mean: an untrained architecture
ENTRY_DEFAULTS = {"weights": "random", "pretraining": "none"}
# keys that change where or how a run is launched but not what it computes
_NOT_HASHED = {"data": ("num_workers",), "trainer": ("enable_progress_bar", "default_root_dir", "log_every_n_steps")}


def config_hash(cfg: DictConfig | dict[str, Any]) -> str:
    """Stable short hash of what a run computes: backbone (with the content of a weights file), task, data,
    trainer and seed."""
    from arena.config import entry_fields  # here: reading records (leaderboards) needs neither torch nor timm

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    keep = {k: c.get(k) for k in ("backbone", "task", "data", "trainer", "seed")}
    weights = entry_fields(keep["backbone"])["weights"] if isinstance(keep["backbone"], dict) else ""
    if weights.startswith("file:"):  # the config names a file by its path; retrained weights are another run
        keep["weights"] = weights
    for group, keys in _NOT_HASHED.items():
        if isinstance(keep.get(group), dict):
            keep[group] = {k: v for k, v in keep[group].items() if k not in keys}
    blob = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import lightning
    import timm
    import torch
    import torchvision

    import arena

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "lightning": lightning.__version__, "backbone_arena": arena.__version__}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only when the block succeeds.

    Readers see the old file or the new one, never a torn one; a failed write leaves no trace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically (see ``atomic_path``), synced to disk before it replaces the old file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def make_record(*, stage: str, status: str, cfg: DictConfig, family: str, metrics: dict[str, float],
                params: int | None, flops: int | None, wall_time_s: float, run_dir: str | Path,
                primary_metric: str, checkpoint: str | None = None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    from arena.config import entry_fields

    task = cfg.task
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "stage": stage,
        "backbone": cfg.backbone.name,
        **entry_fields(cfg.backbone),
        "family": family,
        "task": task.name,
        "mode": task.get("mode", "fine_tune"),
        "head": task.get("head") if isinstance(task.get("head"), str) else None,
        "dataset": cfg.data.name,
        "seed": int(cfg.seed),
        "config_hash": config_hash(cfg),
        "primary_metric": primary_metric,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "params": params,
        "flops": flops,
        "image_size": cfg.data.get("image_size"),
        "wall_time_s": round(float(wall_time_s), 3),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "error": error,
        **extra,
    }


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record lacks required keys {missing}")
    return write_json_atomic(Path(run_dir) / RECORD_NAME, record)


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    with open(path) as f:
        rec = json.load(f)
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ValueError(f"{path} is not a run record: it lacks {missing}")
    return {**ENTRY_DEFAULTS, "entry": rec["backbone"], **rec}


def find_records(root: str | Path) -> Iterator[dict[str, Any]]:
    """Every readable record under ``root`` (unreadable ones are skipped: they are not results)."""
    for p in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            yield read_record(p)
        except (ValueError, json.JSONDecodeError, OSError):
            continue
