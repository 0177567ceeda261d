"""What every task module shares: the backbone, freezing, optimiser and schedule, the record.

Optimisation follows timm: parameter groups without weight decay for norms and biases, optional
layer-wise LR decay from the backbone's ``group_matcher`` (``timm.optim.param_groups_layer_decay``),
any optimiser from ``timm.optim.create_optimizer_v2`` (AdamW by default) and timm's cosine
schedule with linear warm-up stepped per optimiser step.
"""
from __future__ import annotations

from typing import Any

import lightning as L

from backbones import Backbone, SimpleFeaturePyramid

MODES = ("fine_tune", "linear_probe", "frozen")


class TaskModule(L.LightningModule):
    """Base LightningModule: subclasses build ``self.head`` and implement the steps and metrics.

    ``mode="linear_probe"`` (classification) or ``"frozen"`` (dense tasks) freezes the backbone:
    no gradients, and BatchNorm statistics frozen because it stays in eval mode. A simple
    pyramid added for a dense head stays trainable. ``fine_tune`` trains everything.

    A task whose class sets ``reads_embed = False`` (it reads only feature levels) prunes the
    backbone to them (``Backbone.prune_to_features``), so every parameter it carries is trained:
    what DistributedDataParallel requires, and no optimiser state or weight decay is spent on
    a pooled head nothing reads. A task that reads ``embed`` only (the default) freezes the
    modules ``embed`` never uses instead (``Backbone.freeze_feature_modules``).
    """

    name: str = "task"
    primary_metric: str = ""  # the test metric leaderboards rank by
    reads_embed: bool = True  # True: the task reads only embed(); False: only feature levels
    arena_config: dict[str, Any] | None = None  # the run's resolved config, saved in checkpoints
    arena_overrides: list[str] | None = None  # its command-line overrides, so eval.py can recompose it
    trains: bool = True  # False: a training-free probe, which train.py only tests

    def __init__(self, *, backbone: Backbone, mode: str = "fine_tune", optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.05, layer_decay: float | None = None, warmup_epochs: float = 1.0,
                 min_lr: float = 1e-6, backbone_lr_scale: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] or null, got {layer_decay}")
        if self.reads_embed:
            backbone.freeze_feature_modules()
        else:
            backbone.prune_to_features()
        self.backbone = backbone
        self.mode = mode
        self.frozen_part = backbone.inner if isinstance(backbone, SimpleFeaturePyramid) else backbone
        self.opt_cfg = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                            warmup_epochs=warmup_epochs, min_lr=min_lr, backbone_lr_scale=backbone_lr_scale)
        if self.frozen:
            self.frozen_part.requires_grad_(False)
            self.frozen_part.eval()

    @property
    def frozen(self) -> bool:
        return self.mode != "fine_tune"

    def train(self, mode: bool = True) -> "TaskModule":
        super().train(mode)
        if self.frozen:
            self.frozen_part.eval()
        return self

    def _backbone_groups(self) -> list[dict[str, Any]]:
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay

        wd, ld = self.opt_cfg["weight_decay"], self.opt_cfg["layer_decay"]
        nwd = getattr(self.backbone, "no_weight_decay", lambda: set())()
        if ld is not None:
            if not hasattr(self.backbone, "group_matcher"):
                raise ValueError(f"layer_decay needs a backbone with group_matcher(); "
                                 f"{type(self.backbone).__name__} has none. Set task.layer_decay=null")
            groups = param_groups_layer_decay(self.backbone, weight_decay=wd, no_weight_decay_list=nwd, layer_decay=ld)
        else:
            groups = param_groups_weight_decay(self.backbone, weight_decay=wd, no_weight_decay_list=nwd)
        for g in groups:
            g["lr_scale"] = g.get("lr_scale", 1.0) * self.opt_cfg["backbone_lr_scale"]
        return groups

    def _head_groups(self) -> list[dict[str, Any]]:
        """Every trainable parameter outside the backbone, with timm's no-decay rule for norms and biases.

        Parameters are taken by identity, so a head that holds the backbone (torchvision's detectors
        do) does not group it twice.
        """
        in_backbone = {id(p) for p in self.backbone.parameters()}
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if id(p) in in_backbone or not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": self.opt_cfg["weight_decay"]}]

    def configure_optimizers(self) -> dict[str, Any]:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        groups = [g for g in self._backbone_groups() + self._head_groups() if g["params"]]
        opt = create_optimizer_v2(groups, opt=self.opt_cfg["optimizer"], lr=self.opt_cfg["lr"],
                                  weight_decay=self.opt_cfg["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = min(int(self.opt_cfg["warmup_epochs"] * per_epoch), total // 2)
        sched = CosineLRScheduler(opt, t_initial=total, lr_min=self.opt_cfg["min_lr"], warmup_t=warmup,
                                  warmup_lr_init=self.opt_cfg["lr"] * 0.01, warmup_prefix=True, t_in_epochs=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["arena_config"] = self.arena_config
        checkpoint["arena_overrides"] = self.arena_overrides

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def save_pictures(self, datamodule: Any, out_dir: Any, num: int) -> list[Any]:
        """Draw ``num`` test images with predictions and truth into ``out_dir`` (dense tasks)."""
        raise ValueError(f"task {self.name!r} draws no pictures; save_images works for detection and segmentation")

    def test_split_names(self) -> list[str]:
        """The datamodule's test sets in dataloader order: ``test``, then any ``ood/<name>``."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return list(getattr(datamodule, "test_splits", None) or ["test"])

    def test_metrics(self) -> dict[str, float]:
        """The task's test metrics for the run record, read from what ``test`` logged."""
        out = {}
        for k, v in self.trainer.callback_metrics.items():
            if k.startswith("test/"):
                out[k[len("test/"):]] = float(v)
        return out
