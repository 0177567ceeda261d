"""One run over several processes (Lightning DDP): SyncBatchNorm where it works, test metrics counted once.

Training runs on every process, each on its shard of the training set (Lightning's
``DistributedSampler``). Testing does not: that sampler pads the last shard with repeated
samples so every process gets as many batches, and those samples would be scored twice. So
after ``fit`` the processes other than rank 0 stop, and rank 0 tests alone with a single-device
trainer built from the same trainer config (same accelerator and precision) over the whole test
set; the process group is torn down first, so torchmetrics computes from rank 0's own states
instead of waiting for the others. Only rank 0 writes the record; Lightning writes checkpoints
from rank 0 only.

On CPU (the gloo backend) ``trainer.sync_batchnorm`` is turned off with an info line: PyTorch's
``SyncBatchNorm`` runs on GPUs only, and ``trainer=ddp trainer.accelerator=cpu trainer.devices=2``
is how a multi-GPU configuration is checked on a laptop.

A multirun cell (a battle) cannot start its own processes: Lightning starts them by running the
command line again, which would run the whole sweep again. Its processes must come from the
cluster: SLURM (``hydra/launcher=slurm`` with ``tasks_per_node`` = ``gpus_per_node`` =
``trainer.devices``) or ``torchrun``; ``check_launch`` refuses the rest before anything trains.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def runs_on_cpu(trainer_cfg: DictConfig) -> bool:
    """Whether ``trainer.accelerator`` resolves to the CPU (``auto`` without CUDA included)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def resolve_sync_batchnorm(trainer_cfg: DictConfig) -> DictConfig:
    """The trainer config with ``sync_batchnorm`` off on CPU, where PyTorch's ``SyncBatchNorm`` cannot run."""
    if trainer_cfg.get("sync_batchnorm") and runs_on_cpu(trainer_cfg):
        log.info("trainer.sync_batchnorm=true turned off: SyncBatchNorm runs on GPUs only, and this run is on "
                 "CPU (gloo); each process normalises with its own batch statistics")
        trainer_cfg = trainer_cfg.copy()
        with open_dict(trainer_cfg):
            trainer_cfg.sync_batchnorm = False
    return trainer_cfg


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a multi-process trainer inside a Hydra multirun unless the cluster started the processes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if trainer.world_size == 1 or not multirun or SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return
    raise ValueError(
        f"trainer runs {trainer.world_size} processes in a multirun cell, which would launch the whole sweep again "
        f"in each of them; run battles on several devices with hydra/launcher=slurm and tasks_per_node = "
        f"gpus_per_node = trainer.devices (SLURM starts one process per device), or run a single cell without -m")


def single_test_trainer(trainer: L.Trainer, trainer_cfg: DictConfig) -> L.Trainer | None:
    """The trainer that scores the whole test set exactly once.

    ``trainer`` itself when it runs one process; under DDP a single-device trainer on rank 0
    (same config, same loggers) and ``None`` on the other ranks, which have nothing to test.
    """
    if trainer.world_size == 1:
        return trainer
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if trainer.global_rank != 0:
        return None
    return instantiate(trainer_cfg, devices=1, num_nodes=1, strategy="auto", sync_batchnorm=False,
                       enable_checkpointing=False, callbacks=[], logger=trainer.loggers or False)
