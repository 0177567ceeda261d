"""Semantic segmentation: a decode head on the backbone's pyramid, scored by dataset-level mIoU.

The mIoU is computed from one confusion matrix accumulated over the whole split (torchmetrics'
``MulticlassConfusionMatrix``, pixels equal to ``ignore_index`` left out), not as a mean of
per-image IoUs: ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` and the mean over classes. A class absent
from both the predictions and the truth of the split has no IoU (NaN) and is left out of the mean
and of the logged per-class IoUs.

Inference runs on the whole image (padded to the backbone's input multiple) or in sliding
windows (``inference="slide"``, ``window``/``stride`` in pixels, overlapping logits averaged);
either way logits are upsampled to the input size.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from backbones import Backbone, as_pyramid
from heads import build_segmentation_head

from .base import TaskModule

INFERENCE = ("whole", "slide")


def segmentation_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class IoU, mIoU and pixel accuracy from a confusion matrix (rows truth, columns prediction).

    >>> s = segmentation_scores(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    >>> [round(v, 2) for v in s["iou"].tolist()[:2]], round(float(s["miou"]), 3), float(s["pixel_acc"])
    ([0.75, 0.8], 0.775, 0.875)
    >>> bool(s["iou"][2].isnan())  # class 2 is in neither truth nor prediction
    True
    """
    cm = confusion.double()
    tp = cm.diagonal()
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)  # 0 / 0 = NaN for a class absent from both
    return {"iou": iou, "miou": iou.nanmean(), "pixel_acc": tp.sum() / cm.sum()}


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins covering ``length``; the last window ends at the border."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, max(length - window, 0)) for i in range(count)})


def _metric_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


class SegmentationTask(TaskModule):
    """A segmentation head (``upernet``, ``semantic_fpn``, ``mlp``) on any backbone.

    Single-stride backbones get a simple feature pyramid (``as_pyramid``). The loss is
    cross-entropy over pixels other than ``ignore_index``, plus ``aux_weight`` times that of
    the head's auxiliary output when it has one (UPerNet's FCN head).
    """

    name = "segmentation"
    primary_metric = "miou"
    reads_embed = False

    def __init__(self, *, backbone: Backbone, num_classes: int, head: str = "upernet",
                 head_kwargs: Mapping[str, Any] | None = None, aux_weight: float = 0.4, ignore_index: int = 255,
                 inference: str = "whole", window: int | None = None, stride: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(backbone=as_pyramid(backbone), **kwargs)
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {inference!r}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        if inference == "slide":
            if window is None:
                raise ValueError("inference='slide' needs window=<side in pixels> (task.module.window)")
            stride = stride or max(1, window * 2 // 3)
            if not 0 < stride <= window:
                raise ValueError(f"stride must be in [1, window={window}], got {stride}")
            self.backbone.check_input_size(window, window)
        self.head = build_segmentation_head(head, feature_info=self.backbone.feature_info, num_classes=num_classes,
                                            **dict(head_kwargs or {}))
        if not aux_weight:  # an auxiliary head outside the loss would hold weights that never get a gradient
            self.head.aux = None
        self.num_classes, self.ignore_index, self.aux_weight = num_classes, ignore_index, aux_weight
        self.inference, self.window, self.stride = inference, window, stride
        self.confusion = torch.nn.ModuleDict({
            stage: MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
            for stage in ("val", "test")})

    # --- inference ------------------------------------------------------------------------------------------

    def _padded_logits(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits for ``x`` padded (bottom, right) to ``size``, upsampled, cropped back to ``x``."""
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, size[1] - w, 0, size[0] - h))
        logits = F.interpolate(self.head(self.backbone(padded)), size=size, mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        logits = x.new_zeros(n, self.num_classes, h, w)
        count = x.new_zeros(1, 1, h, w)
        for top in _window_starts(h, self.window, self.stride):
            for left in _window_starts(w, self.window, self.stride):
                crop = x[..., top:top + self.window, left:left + self.window]
                logits[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += \
                    self._padded_logits(crop, (self.window, self.window))
                count[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += 1
        return logits / count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the input's size, by the configured inference mode."""
        if self.inference == "slide":
            return self._slide(x)
        m = self.backbone.input_multiple
        h, w = x.shape[-2:]
        return self._padded_logits(x, (math.ceil(h / m) * m, math.ceil(w / m) * m))

    # --- steps ----------------------------------------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, mask, ignore_index=self.ignore_index)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, mask = batch
        features = self.backbone(x)
        loss = self._loss(self.head(features), mask)
        if self.head.aux is not None and self.aux_weight:
            aux = self._loss(self.head.aux(features), mask)
            self.log("train/aux_loss", aux, batch_size=len(x))
            loss = loss + self.aux_weight * aux
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, mask = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, mask, ignore_index=self.ignore_index), batch_size=len(x))
        self.confusion[stage].update(logits.argmax(1), mask)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def class_names(self, datamodule: Any = None) -> list[str]:
        """The class names of ``datamodule`` (default: the trainer's) when they fit, else the class indices."""
        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "class_names", None) or [])
        return names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def _log_scores(self, stage: str) -> None:
        scores = segmentation_scores(self.confusion[stage].compute())
        self.confusion[stage].reset()
        self.log(f"{stage}/miou", scores["miou"].float(), prog_bar=True)
        self.log(f"{stage}/pixel_acc", scores["pixel_acc"].float())
        if stage == "test":
            for name, iou in zip(self.class_names(), scores["iou"].tolist()):
                if not math.isnan(iou):
                    self.log(f"test/iou_{_metric_name(name)}", iou)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    # --- pictures -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def save_pictures(self, datamodule: Any, out_dir: str | Path, num: int) -> list[Path]:
        """Save the first ``num`` test images as PNGs: image, truth overlay and prediction overlay side by side.

        Classes are coloured from matplotlib's ``tab20``; a class named ``background`` and ignored
        pixels are left uncoloured.
        """
        import matplotlib
        from torchvision.io import write_png
        from torchvision.utils import draw_segmentation_masks

        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cmap = matplotlib.colormaps["tab20"]
        colors = [tuple(int(255 * c) for c in cmap(i % cmap.N)[:3]) for i in range(self.num_classes)]
        drawn = [i for i, n in enumerate(self.class_names(datamodule)) if n.lower() != "background"]
        mean = torch.tensor(datamodule.mean).view(3, 1, 1)
        std = torch.tensor(datamodule.std).view(3, 1, 1)
        datamodule.setup("test")
        dataset = datamodule.datasets["test"]
        was_training, paths = self.training, []
        self.eval()
        try:
            for index in range(min(num, len(dataset))):
                image, truth = dataset[index]
                guess = self(image[None].to(self.device)).argmax(1)[0].cpu()
                rgb = ((image * std + mean).clamp(0, 1) * 255).to(torch.uint8)
                overlays = [draw_segmentation_masks(rgb, torch.stack([m == c for c in drawn]), alpha=0.55,
                                                    colors=[colors[c] for c in drawn]) for m in (truth, guess)]
                paths.append(out_dir / f"{index:04d}.png")
                write_png(torch.cat([rgb, *overlays], dim=-1), str(paths[-1]))
        finally:
            self.train(was_training)
        return paths
