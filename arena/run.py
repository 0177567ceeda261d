"""The pieces ``train.py`` and ``eval.py`` share: build a run from its config, write its record.

A run is built in a fixed order so that bad input fails before anything is trained or written:
backbone -> datamodule (with the backbone's preprocessing) -> input-size check -> task module
(its head sized from ``feature_info`` and the data's classes) -> trainer.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from backbones import Backbone

from .bench import count_flops, count_params
from .config import resolve_data_config
from .data.base import ArenaDataModule
from .records import make_record, write_record
from .scaling import check_launch, resolve_sync_batchnorm, single_test_trainer
from .tasks.base import TaskModule


@dataclass
class Run:
    cfg: DictConfig
    backbone: Backbone
    datamodule: ArenaDataModule
    module: TaskModule
    trainer: L.Trainer
    run_dir: Path
    started: float = field(default_factory=time.time)


def resolve_num_classes(cfg: DictConfig, datamodule: ArenaDataModule) -> int:
    """The data decides the number of classes; a configured number must agree with it."""
    wanted = cfg.task.get("num_classes")
    if wanted is not None and int(wanted) != datamodule.num_classes:
        raise ValueError(f"task.num_classes={wanted} but data {cfg.data.name!r} has {datamodule.num_classes} "
                         f"classes ({', '.join(datamodule.class_names[:10])}...); drop task.num_classes or fix it")
    return datamodule.num_classes


def build_run(cfg: DictConfig, run_dir: str | Path) -> Run:
    """Instantiate everything a run needs from its composed config."""
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(run_dir)
    backbone: Backbone = instantiate(cfg.backbone)
    data_config = resolve_data_config(backbone, cfg.data.get("image_size"))
    datamodule: ArenaDataModule = instantiate(cfg.data, task=cfg.task.name, data_config=data_config)
    backbone.check_input_size(*datamodule.image_size)
    module: TaskModule = instantiate(cfg.task.module, backbone=backbone,
                                     num_classes=resolve_num_classes(cfg, datamodule))
    module.arena_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(resolve_sync_batchnorm(cfg.trainer), callbacks=callbacks,
                                     logger=loggers or False)
    check_launch(trainer)
    return Run(cfg, backbone, datamodule, module, trainer, run_dir)


def backbone_costs(backbone: Backbone, image_size: tuple[int, int]) -> tuple[int, int | None]:
    """Parameters and forward FLOPs of the backbone alone at the run's resolution."""
    params = count_params(backbone)
    try:
        flops = count_flops(backbone, image_size)
    except Exception as e:  # an op the counter cannot trace must not lose the run's results
        warnings.warn(f"FLOPs of {type(backbone).__name__} could not be counted: {e}")
        flops = None
    return params, flops


def run_test(run: Run) -> None:
    """Test the run's module over the whole test set exactly once (under DDP: on rank 0 alone, see ``arena.scaling``)."""
    trainer = single_test_trainer(run.trainer, run.cfg.trainer)
    if trainer is not None:
        trainer.test(run.module, datamodule=run.datamodule)


def tested_weights(*, trainer: L.Trainer | None = None, checkpoint: dict[str, Any] | None = None) -> str:
    """Which weights a test scored: ``"ema"`` when ``trainer`` averages them (an EMA callback) or ``checkpoint``
    was saved by such a trainer (its ``state_dict`` is then the average), else ``"final"`` (the weights as trained)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    if checkpoint is not None:
        return "ema" if "averaging_state" in checkpoint else "final"
    return "ema" if trainer and any(isinstance(c, EMAWeightAveraging) for c in trainer.callbacks) else "final"


def finish_run(run: Run, *, stage: str, checkpoint: str | None = None,
               weights: str | None = None) -> dict[str, Any] | None:
    """Write the run's record from what ``run_test`` logged; returns the record (``None`` on DDP ranks > 0).

    ``weights`` names the tested weights (``tested_weights``); by default they follow the trainer's callbacks.
    """
    if run.trainer.global_rank != 0:
        return None
    params, flops = backbone_costs(run.backbone, run.datamodule.image_size)
    record = make_record(stage=stage, status="complete", cfg=run.cfg, family=run.backbone.family,
                         metrics=run.module.test_metrics(), params=params, flops=flops,
                         wall_time_s=time.time() - run.started, run_dir=run.run_dir, checkpoint=checkpoint,
                         primary_metric=run.module.primary_metric,
                         tested_weights=weights or tested_weights(trainer=run.trainer))
    write_record(run.run_dir, record)
    return record


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of this project, read without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {str(path)!r} safely ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); "
                         f"to load backbone weights use backbone.pretrained=<file>")
    return ckpt

