"""Detection heads from torchvision on any registered backbone: Faster R-CNN, Mask R-CNN, RetinaNet, FCOS.

``build_detector`` puts a ``BackboneWithFPN`` (the backbone plus torchvision's FPN over its
``feature_info``) under one of torchvision's detectors, unchanged. What depends on the head:

============  ===============  ===============  ======================================
head          FPN levels       extra levels     anchors per level (``s`` = stride)
============  ===============  ===============  ======================================
faster_rcnn   stride >= 4      max-pool         ``8s``, ratios 0.5, 1, 2
mask_rcnn     stride >= 4      max-pool         ``8s``, ratios 0.5, 1, 2
retinanet     stride >= 8      P6, P7           ``4s * 2^(k/3)``, k = 0, 1, 2, ratios 0.5, 1, 2
fcos          stride >= 8      P6, P7           ``s`` (one point per location)
============  ===============  ===============  ======================================

These are torchvision's own settings for 800-pixel images, written per stride so they follow
the levels a backbone has; ``anchor_scale`` replaces the multiplier (8, 4, 1) for other scales.

Images go in as a list of ``[3, H, W]`` tensors in ``[0, 1]``. torchvision's
``GeneralizedRCNNTransform`` normalises them with the backbone's own mean and std, resizes the
longer side to ``image_size`` (boxes of the predictions are mapped back to the input size) and
pads the batch to the backbone's ``input_multiple`` (to its fixed input size, for models that
take only one). ``resize_train=False`` leaves training images at the size the data gives them,
for data pipelines that rescale themselves (multi-scale training).

>>> import torch
>>> from backbones import create_backbone
>>> model = build_detector("fcos", backbone=create_backbone("convnext_test"), num_classes=3, image_size=64,
...                        fpn_channels=64).eval()
>>> sorted(model([torch.rand(3, 48, 64)])[0])
['boxes', 'labels', 'scores']
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from backbones import Backbone

from .necks import BackboneWithFPN


@dataclass(frozen=True)
class HeadSpec:
    """What a torchvision detector expects of its feature pyramid and anchors."""

    min_stride: int  # the finest backbone level the FPN uses
    extra_blocks: str  # see ``FPN``
    anchor_scale: float  # anchor side per unit of stride
    octaves: int  # anchor sizes per level, 2^(k/octaves) apart
    aspect_ratios: tuple[float, ...]
    masks: bool = False  # needs instance masks in the targets


HEADS: dict[str, HeadSpec] = {
    "faster_rcnn": HeadSpec(4, "max_pool", 8.0, 1, (0.5, 1.0, 2.0)),
    "mask_rcnn": HeadSpec(4, "max_pool", 8.0, 1, (0.5, 1.0, 2.0), masks=True),
    "retinanet": HeadSpec(8, "p6p7", 4.0, 3, (0.5, 1.0, 2.0)),
    "fcos": HeadSpec(8, "p6p7", 1.0, 1, (1.0,)),
}


def head_spec(kind: str) -> HeadSpec:
    """The ``HeadSpec`` of ``kind``; ``ValueError`` naming the accepted heads otherwise."""
    if kind not in HEADS:
        raise ValueError(f"detection head must be one of {tuple(HEADS)}, got {kind!r}")
    return HEADS[kind]


def anchor_generator(strides: Sequence[int], *, scale: float, octaves: int = 1,
                     aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> AnchorGenerator:
    """torchvision's ``AnchorGenerator`` with ``octaves`` sizes of ``scale * stride * 2^(k/octaves)`` per level.

    >>> anchor_generator((8, 16), scale=4.0, octaves=1).sizes
    ((32.0,), (64.0,))
    """
    sizes = tuple(tuple(scale * s * 2 ** (k / octaves) for k in range(octaves)) for s in strides)
    return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(strides))


def build_detector(kind: str, *, backbone: Backbone, num_classes: int, image_size: int, fpn_channels: int = 256,
                   anchor_scale: float | None = None, image_mean: Sequence[float] | None = None,
                   image_std: Sequence[float] | None = None, resize_train: bool = True,
                   **kwargs: Any) -> nn.Module:
    """A torchvision detector of ``kind`` on ``backbone`` with an FPN of ``fpn_channels``.

    ``num_classes`` counts the background: labels of objects are ``1..num_classes - 1``.
    ``image_mean``/``image_std`` default to the backbone's ``pretrained_cfg``. ``kwargs`` go to
    the torchvision constructor (e.g. ``box_batch_size_per_image``, ``score_thresh``), except
    ``representation_size``: the width of the R-CNN box head's two layers (torchvision's 1024).
    Mask R-CNN's mask head is four convolutions as wide as the FPN, as in torchvision.
    """
    spec = head_spec(kind)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size (the longer image side) must be >= 32, got {image_size}")
    if kind in ("retinanet", "fcos") and (fpn_channels % 32 or fpn_channels < 64):
        raise ValueError(f"{kind}'s head normalises with GroupNorm(32, C), which needs two channels per group "
                         f"on 1x1 maps: fpn_channels must be a multiple of 32 and >= 64, got {fpn_channels}")
    neck = BackboneWithFPN(backbone, out_channels=fpn_channels, extra_blocks=spec.extra_blocks,
                           min_stride=spec.min_stride)
    anchors = anchor_generator(neck.strides, scale=anchor_scale or spec.anchor_scale, octaves=spec.octaves,
                               aspect_ratios=spec.aspect_ratios)
    body = neck.body
    transform = dict(min_size=image_size, max_size=image_size,
                     image_mean=list(image_mean or body.pretrained_cfg["mean"]),
                     image_std=list(image_std or body.pretrained_cfg["std"]),
                     size_divisible=body.fixed_input_size or body.input_multiple, _skip_resize=not resize_train)
    if kind == "retinanet":
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        return RetinaNet(neck, num_classes, anchor_generator=anchors, head=head, **transform, **kwargs)
    if kind == "fcos":
        return FCOS(neck, num_classes, anchor_generator=anchors, **transform, **kwargs)
    levels = [n for n in neck.names if n != "pool"]  # RoIs are pooled from the FPN levels proper
    width = kwargs.pop("representation_size", 1024)
    rcnn = dict(rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
                box_head=TwoMLPHead(fpn_channels * 7 * 7, width), box_predictor=FastRCNNPredictor(width, num_classes),
                **transform)
    if kind == "mask_rcnn":
        return MaskRCNN(neck, None, mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                        mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1),
                        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes), **rcnn, **kwargs)
    return FasterRCNN(neck, None, **rcnn, **kwargs)


__all__ = ["build_detector", "anchor_generator", "head_spec", "HeadSpec", "HEADS"]
