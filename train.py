"""Train one backbone on one task and dataset, test it, and write the run record ``metrics.json``.

    python train.py                                            # default backbone, shapes classification, CPU
    python train.py backbone=maxvit_tiny data=imagefolder data.root=/data/cifar10
    python train.py task.mode=linear_probe logger=wandb trainer=gpu
    python train.py ckpt_path=last hydra.run.dir=<run dir>     # resume an interrupted run
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
from arena.run import build_run, finish_run, run_test

register_configs()


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict | None:
    """Fit (unless the task is training-free), test with the final weights, and write the record; returns the
    record (``None`` on DDP ranks > 0)."""
    run = build_run(cfg, run_dir)
    run.module.arena_overrides = list(overrides or [])
    if run.module.trains:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    run_test(run)
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    return finish_run(run, stage="train", checkpoint=str(ckpt) if ckpt.exists() else None)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:  # a grid cell: skip if done, resume if interrupted, record failures
        record = run_cell(cfg, hc.runtime.output_dir, list(hc.overrides.task), train, root=hc.sweep.dir)
    else:
        record = train(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    metric = cfg.get("optimized_metric")
    return record["metrics"].get(metric) if metric and record else None


if __name__ == "__main__":
    check_backbone_override(sys.argv[1:])
    main()
