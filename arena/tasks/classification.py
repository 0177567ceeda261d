"""Image classification: fine-tune or linear probe, top-1/top-5 through torchmetrics.

Extra test sets of the data with the same classes (OOD sets, ``ood/<name>``) are scored like the
test set and recorded as ``ood/<name>/acc1``, ``ood/<name>/acc5`` and ``ood/<name>/loss``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from backbones import Backbone
from heads import ClassificationHead

from .base import TaskModule


class ClassificationTask(TaskModule):
    """Classifier on the backbone's embedding (``embed``).

    ``use_backbone_classifier=True`` scores with the backbone's own pretrained classifier
    (``backbone.logits``) instead of a new head, to check published accuracies.
    """

    name = "classification"
    primary_metric = "acc1"

    def __init__(self, *, backbone: Backbone, num_classes: int, label_smoothing: float = 0.0, dropout: float = 0.0,
                 use_backbone_classifier: bool = False, **kwargs: Any) -> None:
        super().__init__(backbone=backbone, **kwargs)
        self.num_classes = num_classes
        self.use_backbone_classifier = use_backbone_classifier
        if use_backbone_classifier:
            backbone.get_classifier()  # raises with the fix when there is none
        else:
            self.head = ClassificationHead(backbone.feature_info, num_classes=num_classes,
                                           linear_probe=self.frozen, dropout=dropout)
        self.label_smoothing = label_smoothing
        top5 = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({k: MulticlassAccuracy(num_classes=num_classes, top_k=t, average="micro")
                                        for k, t in (("acc1", 1), ("acc5", top5))})
            for stage in ("val", "test")
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_backbone_classifier:
            return self.backbone.logits(x)
        if self.frozen:
            with torch.no_grad():
                emb = self.backbone.embed(x)
        else:
            emb = self.backbone.embed(x)
        return self.head(emb)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metrics: str) -> None:
        """Loss and accuracies logged as ``<prefix>/<name>``; ``metrics`` is the path of their ModuleDict."""
        x, y = batch
        if int(y.max()) >= self.num_classes:
            raise ValueError(f"label {int(y.max())} out of range for num_classes={self.num_classes}")
        logits = self(x)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), batch_size=len(y), add_dataloader_idx=False)
        for k in ("acc1", "acc5"):
            metric = self.get_submodule(f"{metrics}.{k}")
            metric.update(logits, y)
            self.log(f"{prefix}/{k}", metric, prog_bar=k == "acc1", batch_size=len(y), add_dataloader_idx=False,
                     metric_attribute=f"{metrics}.{k}")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", "metrics.val")

    def on_test_start(self) -> None:
        """One pair of accuracy metrics per OOD test set of the datamodule."""
        self.ood_metrics = torch.nn.ModuleDict({split.replace("/", "_"): copy.deepcopy(self.metrics["test"])
                                                for split in self.test_split_names()[1:]})

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._eval_step(batch, "test", "metrics.test")
        else:
            split = self.test_split_names()[dataloader_idx]
            self._eval_step(batch, f"test/{split}", f"ood_metrics.{split.replace('/', '_')}")
