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
