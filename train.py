"""Train one backbone on one task and dataset, test it, and write the run record ``metrics.json``.

    python train.py                                            # default backbone, shapes classification, CPU
    python train.py backbone=maxvit_tiny data=imagefolder data.root=/data/cifar10
    python train.py task.mode=linear_probe logger=wandb trainer=gpu
    python train.py ckpt_path=last hydra.run.dir=<run dir>     # resume an interrupted run (docs/runs.md)
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from arena.battle import run_cell
from arena.config import check_backbone_override, register_configs
from arena.run import (build_run, compose_from_checkpoint, finish_run, fit, logged_failure, resolve_ckpt_path,
                       run_test, trained_overrides, with_checkpoint_overrides)

register_configs()


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict | None:
    """Fit (resuming from ``cfg.ckpt_path`` when set; not at all for a training-free task), test with the final
    weights, and write the record; returns the record (``None`` on DDP ranks > 0). Checkpoints keep the
    ``overrides`` that define what was trained."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    run = build_run(cfg, run_dir)
    run.module.arena_overrides = trained_overrides(overrides or [])
    if run.module.trains:
        fit(run, ckpt_path, overrides or [])
    run_test(run)
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    return finish_run(run, stage="train", checkpoint=str(ckpt) if ckpt.exists() else None)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir, overrides = hc.runtime.output_dir, list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:  # a grid cell: skip if done, resume if interrupted, record failures
        record = run_cell(cfg, run_dir, overrides, train, root=hc.sweep.dir)
    else:
        with logged_failure(run_dir):
            if ckpt_path := resolve_ckpt_path(cfg.get("ckpt_path"), run_dir):  # resume the checkpoint's run
                cfg, overrides = compose_from_checkpoint("train", ckpt_path, overrides, run_dir)
            record = train(cfg, run_dir, overrides)
    metric = cfg.get("optimized_metric")
    return record["metrics"].get(metric) if metric and record else None


if __name__ == "__main__":
    check_backbone_override(sys.argv[1:])
    sys.argv[1:] = with_checkpoint_overrides(sys.argv[1:])
    main()
