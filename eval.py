"""Test a trained checkpoint (or a pretrained backbone) and write the run record ``metrics.json``.

    python eval.py ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt
    python eval.py ckpt_path=<ckpt> data.num_test=5000          # same run, other test settings

A checkpoint carries the command-line overrides of the run that wrote it, so the run is
recomposed exactly; overrides given here are applied on top.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from arena.config import check_backbone_override, register_configs
from arena.run import build_run, finish_run, load_checkpoint, run_test, tested_weights

register_configs()


def evaluate(cfg: DictConfig, run_dir: str) -> dict:
    """Test ``cfg.ckpt_path`` (when set) with the run's own config and write the record."""
    state, weights = None, None
    if cfg.get("ckpt_path"):
        ckpt = load_checkpoint(cfg.ckpt_path)
        state, weights = ckpt["state_dict"], tested_weights(checkpoint=ckpt)
        trained = [o for o in ckpt.get("arena_overrides") or [] if not o.startswith(("ckpt_path=", "hydra."))]
        here = list(HydraConfig.get().overrides.task)
        cfg = compose(config_name="eval", overrides=trained + here)
        with open_dict(cfg):
            cfg.paths.output_dir = run_dir
    run = build_run(cfg, run_dir)
    if state is not None:
        run.module.load_state_dict(state, strict=True)
    run_test(run)
    if cfg.get("save_images"):
        run.module.save_pictures(run.datamodule, Path(run_dir) / "pictures", int(cfg.save_images))
    return finish_run(run, stage="eval", checkpoint=cfg.get("ckpt_path"), weights=weights)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    check_backbone_override(sys.argv[1:])
    main()
