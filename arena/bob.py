"""Battle of the Backbones presets: local pretraining for ``experiment=bob_mini``.

``experiment=bob_mini`` compares each architecture at random init with weights pretrained here
on ``shapes`` classification (``+weights=shapes``: ``backbone.pretrained`` is the pretraining
run's ``last.ckpt``). ``PretrainCallback`` makes a single command enough from a fresh clone:
before a cell that loads such weights, it runs the pretraining once, as its own ``train.py`` run.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .battle import existing_record

log = logging.getLogger(__name__)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


class PretrainCallback(Callback):
    """Train ``<out_dir>/<backbone>-<suffix>`` (``train.py backbone=<backbone> <overrides>``) when a cell needs it.

    A cell needs it when its ``backbone.pretrained`` is that run's ``checkpoints/last.ckpt``; a
    run whose record is complete is reused. A failed pretraining is logged, and the cell then
    fails on the missing weights with a record saying so, while the grid goes on.
    """

    def __init__(self, *, out_dir: str, suffix: str, overrides: Sequence[str] = ()) -> None:
        self.out_dir, self.suffix, self.overrides = Path(out_dir), suffix, list(overrides)

    def run_dir(self, backbone: str) -> Path:
        return self.out_dir / f"{backbone}-{self.suffix}"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        name, weights = config.backbone.name, config.backbone.get("pretrained")
        run_dir = self.run_dir(name)
        if weights is None or Path(str(weights)) != run_dir / "checkpoints" / "last.ckpt":
            return
        done = existing_record(run_dir)
        if done is not None and done["status"] == "complete":
            return
        command = [sys.executable, str(TRAIN_SCRIPT), f"backbone={name}", *self.overrides, f"hydra.run.dir={run_dir}"]
        log.info("pretraining %s: %s", run_dir, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            log.error("pretraining %s failed (exit %d): %s", run_dir, result.returncode, result.stderr[-2000:])
