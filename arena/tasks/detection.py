"""Object detection (and instance segmentation) with torchvision's detectors on any backbone, scored COCO-style.

The head is one of ``heads.DETECTION_HEADS`` (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS) over an
FPN on the backbone's levels; ``mode="frozen"`` trains only the neck and head (BoB's frozen
protocol), ``fine_tune`` everything. Metrics are torchmetrics' ``MeanAveragePrecision`` with the
pycocotools backend: ``map`` (AP at IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small``,
``map_medium``, ``map_large`` and recalls ``mar_1/10/100`` for boxes, the same prefixed ``segm_``
for Mask R-CNN's masks, and the test AP of each class as ``map_per_class/<class name>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from backbones import Backbone
from heads.detection import build_detector, head_spec

from .base import TaskModule

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]
PICTURE_SIDE = 512  # small images are enlarged (nearest) to about this size so labels stay readable


class DetectionTask(TaskModule):
    """A torchvision detector of kind ``head`` on ``backbone``; ``num_classes`` counts the background.

    ``image_size`` is the longer image side the detector works at (the data's size),
    ``fpn_channels`` the FPN width, ``anchor_scale`` the anchor side per unit stride (default:
    torchvision's for the head), ``detector_kwargs`` further arguments of the torchvision
    constructor. ``score_threshold`` picks the predictions ``save_pictures`` draws.

    >>> from backbones import create_backbone
    >>> task = DetectionTask(backbone=create_backbone("convnext_test"), num_classes=3, head="retinanet",
    ...                      image_size=64, fpn_channels=64, mode="frozen")
    >>> task.primary_metric, type(task.detector).__name__, task.backbone.training
    ('map', 'RetinaNet', False)
    """

    name = "detection"
    primary_metric = "map"
    reads_embed = False

    def __init__(self, *, backbone: Backbone, num_classes: int, head: str = "faster_rcnn", image_size: int,
                 fpn_channels: int = 256, anchor_scale: float | None = None,
                 detector_kwargs: dict[str, Any] | None = None, score_threshold: float = 0.5,
                 **kwargs: Any) -> None:
        detector = build_detector(head, backbone=backbone, num_classes=num_classes, image_size=image_size,
                                  fpn_channels=fpn_channels, anchor_scale=anchor_scale, resize_train=False,
                                  **dict(detector_kwargs or {}))
        super().__init__(backbone=detector.backbone.body, **kwargs)
        self.detector = detector
        self.head_name, self.masks = head, head_spec(head).masks
        self.score_threshold = score_threshold
        iou_type = ("bbox", "segm") if self.masks else ("bbox",)
        self.val_map = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools")
        self.test_map = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools", class_metrics=True)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Predictions (``boxes``, ``labels``, ``scores``, ``masks`` for Mask R-CNN) in input pixels."""
        return self.detector(images)

    def _check_targets(self, targets: list[dict[str, torch.Tensor]]) -> None:
        if self.masks and any("masks" not in t for t in targets):
            data = self.trainer.datamodule.name if self.trainer.datamodule is not None else "this data"
            raise ValueError(f"task.head={self.head_name} needs instance masks, but {data} has none (targets carry "
                             f"{sorted(targets[0])}); use task.head=faster_rcnn, retinanet or fcos, or COCO data "
                             f"with segmentations")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        self._check_targets(targets)
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        n = len(images)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _update(self, metric: MeanAveragePrecision, batch: Batch) -> None:
        images, targets = batch
        self._check_targets(targets)
        preds = self(images)
        if self.masks:
            preds = [{**p, "masks": p["masks"][:, 0] > 0.5} for p in preds]
            targets = [{**t, "masks": t["masks"].bool()} for t in targets]
        metric.update(preds, targets)

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        result = {k.removeprefix("bbox_"): v for k, v in metric.compute().items()}
        metric.reset()
        classes = result.pop("classes").reshape(-1).tolist()
        names = self.trainer.datamodule.class_names if self.trainer.datamodule is not None else None
        for key, value in result.items():
            if not key.endswith("_per_class"):
                self.log(f"{stage}/{key}", value.float(), prog_bar=key == "map")
            elif key.endswith("map_per_class") and metric.class_metrics:
                for label, ap in zip(classes, value.reshape(-1).tolist()):
                    if ap >= 0:  # -1: the class has no objects in this split
                        self.log(f"{stage}/{key}/{names[label - 1] if names else label}", ap)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update(self.val_map, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update(self.test_map, batch)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    @torch.no_grad()
    def save_pictures(self, datamodule: Any, out_dir: str | Path, num: int) -> list[Path]:
        """Draw the first ``num`` test images: truth in green, predictions above ``score_threshold`` in red.

        Instance masks of Mask R-CNN are overlaid too. Returns the PNG paths (``out_dir/<index>.png``).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        datamodule.setup("test")
        dataset, names = datamodule.datasets["test"], datamodule.class_names
        self.eval()
        paths = []
        for i in range(min(num, len(dataset))):
            image, target = dataset[i]
            pred = self.detector([image.to(self.device)])[0]
            keep = pred["scores"] >= self.score_threshold
            zoom = max(1, PICTURE_SIDE // max(image.shape[-2:]))
            canvas = (image * 255).round().to(torch.uint8).repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
            if self.masks and keep.any():
                masks = pred["masks"][keep, 0].cpu() > 0.5
                canvas = draw_segmentation_masks(canvas, masks.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2),
                                                 alpha=0.4)
            if len(target["boxes"]):
                canvas = draw_bounding_boxes(canvas, target["boxes"] * zoom, colors="lime", width=2,
                                             labels=[names[k - 1] for k in target["labels"].tolist()])
            if keep.any():
                canvas = draw_bounding_boxes(canvas, pred["boxes"][keep].cpu() * zoom, colors="red", width=2,
                                             labels=[f"{names[k - 1]} {s:.2f}" for k, s in
                                                     zip(pred["labels"][keep].tolist(), pred["scores"][keep].tolist())])
            paths.append(out_dir / f"{i:04d}.png")
            write_png(canvas, str(paths[-1]))
        return paths
