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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

RECORD_NAME = "metrics.json"
SCHEMA_VERSION = 1
STATUSES = ("complete", "failed")
REQUIRED_KEYS = ("schema_version", "status", "stage", "backbone", "family", "task", "mode", "dataset", "seed",
                 "primary_metric",
                 "config_hash", "metrics", "params", "flops", "wall_time_s", "versions", "created")
# entry keys: absent from records older than entries; readers default them (weights "random", pretraining
# "none", entry = backbone)
OPTIONAL_TEXT_KEYS = ("weights", "pretraining", "entry")
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


def record_problems(rec: Any) -> list[str]:
    """Why ``rec`` is not a valid run record (empty when it is): shape and types of what leaderboards read."""
    if not isinstance(rec, dict):
        return [f"not a JSON object (holds {json.dumps(rec)[:40]})"]
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        return [f"lacks required keys {missing}"]
    problems = []
    if not isinstance(rec["schema_version"], int) or rec["schema_version"] > SCHEMA_VERSION:
        problems.append(f"schema_version {rec['schema_version']!r} is not one this version reads "
                        f"(1..{SCHEMA_VERSION}); upgrade backbone-arena")
    if rec["status"] not in STATUSES:
        problems.append(f"status {rec['status']!r} is not one of {STATUSES}")
    for key in ("backbone", "family", "task", "mode", "dataset", "primary_metric", "created",
                *(k for k in OPTIONAL_TEXT_KEYS if k in rec)):
        if not isinstance(rec[key], str):
            problems.append(f"{key} {rec[key]!r} is not a string")
    if not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool):
        problems.append(f"seed {rec['seed']!r} is not an integer")
    metrics = rec["metrics"]
    if not isinstance(metrics, dict) or not all(_is_number(v) for v in metrics.values()):
        problems.append(f"metrics {json.dumps(metrics)[:60]} is not an object of numbers")
    for key in ("params", "flops", "wall_time_s"):
        if rec[key] is not None and not _is_number(rec[key]):
            problems.append(f"{key} {rec[key]!r} is not a number")
    return problems


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RecordError(ValueError):
    """A ``metrics.json`` that cannot be used as a record: ``path`` and the human-readable ``reason``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is not a usable run record: {reason}")
        self.path, self.reason = path, reason


def read_record(path: str | Path) -> dict[str, Any]:
    """The record at ``path`` (a ``metrics.json`` or its run directory); ``RecordError`` (a ``ValueError``)
    naming the file and the reason when it cannot be read, is not JSON or is not a valid record."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    try:
        rec = json.loads(path.read_text())
    except OSError as e:
        raise RecordError(path, f"cannot be read ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(path, f"invalid JSON ({e})") from e
    problems = record_problems(rec)
    if problems:
        raise RecordError(path, "; ".join(problems))
    return {**ENTRY_DEFAULTS, "entry": rec["backbone"], **rec}


@dataclass
class RecordScan:
    """The records found under a directory: ``records`` that can be read, ``unreadable`` (path, reason) pairs."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def scan_records(root: str | Path) -> RecordScan:
    """Every record under ``root``; those that cannot be read are listed with the reason, never dropped silently."""
    scan = RecordScan()
    for p in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            scan.records.append(read_record(p))
        except RecordError as e:
            scan.unreadable.append((str(p), e.reason))
    return scan


def find_records(root: str | Path) -> list[dict[str, Any]]:
    """Every readable record under ``root`` (``scan_records`` also says which ones could not be read)."""
    return scan_records(root).records
