"""Shared fixtures: compose the project's Hydra configs the way train.py does, on CPU; set intra-op threads."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from arena.config import register_configs  # noqa: E402

register_configs()

FAST = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=csv"]
FAST_SHAPES = ["data.num_train=64", "data.num_val=32", "data.num_test=32", "data.batch_size=16"]


@pytest.fixture
def set_threads() -> Callable[[int], None]:
    """``set_threads(n)``: torch's intra-op threads for the rest of the test; the count before is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, config="train")`` -> a composed config writing under ``tmp_path``."""

    def _make(*overrides: str, config: str = "train", run_dir: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3")  # stays set, as in hydra.main
        shapes = config == "train" and not any(o.startswith("data=") for o in overrides)
        fast = FAST + (FAST_SHAPES if shapes else [])
        cfg = compose(config_name=config, overrides=[*fast, *overrides], return_hydra_config=True)
        out = run_dir or tmp_path
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _make
    GlobalHydra.instance().clear()
