"""Test a trained checkpoint (or a pretrained backbone) and write the run record ``metrics.json``.

    python eval.py ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt
    python eval.py ckpt_path=<ckpt> data.num_test=5000          # same run, other test settings

A checkpoint carries the command-line overrides of the run that wrote it that define the trained
model (backbone, task, data, seed, a few trainer keys; never callbacks, loggers or a ``_target_``),
so the run is recomposed; overrides given here replace them:

    python eval.py ckpt_path=<detection ckpt> task.module.score_threshold=0.2
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from arena.config import check_backbone_override, register_configs
from arena.run import (build_run, compose_from_checkpoint, finish_run, load_checkpoint, logged_failure,
                       resolve_ckpt_path, run_test, tested_weights, with_checkpoint_overrides)

register_configs()


def evaluate(cfg: DictConfig, run_dir: str) -> dict:
    """Test ``cfg.ckpt_path`` (when set) with the run's own config and write the record."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    weights = None
    if ckpt_path:
        cfg, _ = compose_from_checkpoint("eval", ckpt_path, list(HydraConfig.get().overrides.task), run_dir)
    run = build_run(cfg, run_dir)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        run.module.load_state_dict(ckpt["state_dict"], strict=True)
        weights = tested_weights(checkpoint=ckpt)
    run_test(run)
    if cfg.get("save_images"):
        run.module.save_pictures(run.datamodule, Path(run_dir) / "pictures", int(cfg.save_images))
    return finish_run(run, stage="eval", checkpoint=ckpt_path, weights=weights)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with logged_failure(run_dir):
        evaluate(cfg, run_dir)


if __name__ == "__main__":
    check_backbone_override(sys.argv[1:])
    sys.argv[1:] = with_checkpoint_overrides(sys.argv[1:])
    main()
