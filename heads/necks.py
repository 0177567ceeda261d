"""Necks between a backbone and dense heads: torchvision's feature pyramid network (FPN).

``FPN`` reads only the backbone's ``feature_info``; ``BackboneWithFPN`` chains a backbone and its
FPN into the module torchvision's detectors expect as ``backbone``: ``forward(x)`` returns an
``OrderedDict`` of equal-width maps and ``out_channels`` gives that width. Single-stride
backbones (ViT, Vim) are wrapped in the simple feature pyramid (``backbones.as_pyramid``) first.

>>> from backbones import create_backbone
>>> neck = BackboneWithFPN(create_backbone("convnext_test"), out_channels=32, extra_blocks="p6p7", min_stride=8)
>>> {k: tuple(v.shape) for k, v in neck(torch.zeros(1, 3, 64, 64)).items()}
{'p3': (1, 32, 8, 8), 'p4': (1, 32, 4, 4), 'p5': (1, 32, 2, 2), 'p6': (1, 32, 1, 1), 'p7': (1, 32, 1, 1)}
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from backbones import Backbone, FeatureInfo, as_pyramid
from backbones._features import DENSE_STRIDES

EXTRA_BLOCKS = ("max_pool", "p6p7", "none")


def level_name(stride: int) -> str:
    """``p<log2 stride>``, the usual name of an FPN level (stride 8 -> ``"p3"``)."""
    return f"p{stride.bit_length() - 1}"


class FPN(nn.Module):
    """torchvision's ``FeaturePyramidNetwork`` over the backbone levels with stride >= ``min_stride``.

    ``extra_blocks``: ``"max_pool"`` adds a stride-doubling pooled level (Faster/Mask R-CNN),
    ``"p6p7"`` two strided convolutions on the last FPN level (RetinaNet, FCOS), ``"none"`` nothing.
    ``names`` and ``strides`` describe the returned levels, extras included.

    >>> fpn = FPN(FeatureInfo((16, 32, 64, 128), (4, 8, 16, 32), embed_dim=128), out_channels=8)
    >>> fpn.names, fpn.strides
    (('p2', 'p3', 'p4', 'p5', 'pool'), (4, 8, 16, 32, 64))
    """

    def __init__(self, feature_info: FeatureInfo, *, out_channels: int = 256, extra_blocks: str = "max_pool",
                 min_stride: int = 4) -> None:
        super().__init__()
        if extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks must be one of {EXTRA_BLOCKS}, got {extra_blocks!r}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        self.levels = tuple(i for i, s in enumerate(feature_info.strides) if s >= min_stride)
        if not self.levels:
            raise ValueError(f"no backbone level has stride >= min_stride={min_stride}; "
                             f"levels are (channels, stride) {list(feature_info)}")
        strides = [feature_info.strides[i] for i in self.levels]
        names = [level_name(s) for s in strides]
        extra: ExtraFPNBlock | None = None
        if extra_blocks == "max_pool":
            extra = LastLevelMaxPool()
            strides, names = strides + [2 * strides[-1]], names + ["pool"]
        elif extra_blocks == "p6p7":
            extra = LastLevelP6P7(out_channels, out_channels)
            strides, names = strides + [2 * strides[-1], 4 * strides[-1]], names + ["p6", "p7"]
        self.fpn = FeaturePyramidNetwork([feature_info.channels[i] for i in self.levels], out_channels,
                                         extra_blocks=extra)
        self.out_channels = out_channels
        self.strides, self.names = tuple(strides), tuple(names)

    def forward(self, features: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((self.names[k], features[i]) for k, i in enumerate(self.levels)))


class BackboneWithFPN(nn.Module):
    """A registered backbone followed by an ``FPN``: what torchvision's detectors take as ``backbone``.

    The equivalent of ``torchvision.models.detection.backbone_utils.BackboneWithFPN`` for any
    backbone of the feature contract. ``body`` is the backbone (a single-stride one inside a
    simple feature pyramid), ``fpn`` the neck.
    """

    def __init__(self, backbone: Backbone, *, out_channels: int = 256, extra_blocks: str = "max_pool",
                 min_stride: int = 4) -> None:
        super().__init__()
        self.body = as_pyramid(backbone, strides=tuple(s for s in DENSE_STRIDES if s >= min_stride))
        self.fpn = FPN(self.body.feature_info, out_channels=out_channels, extra_blocks=extra_blocks,
                       min_stride=min_stride)
        self.out_channels = out_channels

    @property
    def strides(self) -> tuple[int, ...]:
        return self.fpn.strides

    @property
    def names(self) -> tuple[str, ...]:
        return self.fpn.names

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


__all__ = ["FPN", "BackboneWithFPN", "EXTRA_BLOCKS", "level_name"]
