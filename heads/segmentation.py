"""Semantic segmentation heads on a feature pyramid: UPerNet, Semantic FPN and an all-MLP head.

Every head takes the backbone's ``feature_info`` (channels and stride of each level, strides
ascending), the number of classes and its own widths, and maps the list of feature maps to class
logits at the resolution of the finest level; the task upsamples them to the input size.
Default widths follow the mmsegmentation configs that the papers report with:

- ``UPerNetHead`` (Xiao et al., 2018): pyramid pooling (scales 1, 2, 3, 6) on the coarsest level,
  an FPN over all levels, every level upsampled to the finest and fused; 512 channels, and an
  auxiliary FCN head on the stride-16 level (256 channels, loss weight 0.4 in the task).
- ``SemanticFPNHead`` (Kirillov et al., 2019): torchvision's ``FeaturePyramidNetwork`` (256
  channels), then per level conv-BN-ReLU-2x-upsample stages down to the finest stride (128
  channels), summed.
- ``MLPHead`` (SegFormer, Xie et al., 2021): a linear layer per level to one width (256), all
  upsampled to the finest level, concatenated, fused by a 1x1 conv and classified.

>>> from backbones import FeatureInfo
>>> info = FeatureInfo(channels=(16, 32, 64, 128), strides=(4, 8, 16, 32), embed_dim=128)
>>> head = build_segmentation_head("upernet", feature_info=info, num_classes=5, channels=32)
>>> feats = [torch.zeros(2, c, 64 // s, 64 // s) for c, s in info]
>>> head(feats).shape
torch.Size([2, 5, 16, 16])
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from backbones import FeatureInfo

HEADS = ("upernet", "semantic_fpn", "mlp")


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    """What every head shares: argument checks and the classifier (dropout, then a 1x1 conv).

    Subclasses build their layers and implement ``forward(features) -> logits``. ``aux`` is an
    auxiliary head whose loss the task adds during training (``None`` for heads without one).
    """

    def __init__(self, *, feature_info: FeatureInfo, num_classes: int, channels: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.feature_info = feature_info
        self.num_classes = num_classes
        self.aux: DecodeHead | None = None
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    @property
    def output_stride(self) -> int:
        """The stride of the logits relative to the input: that of the finest level."""
        return self.feature_info.strides[0]

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.feature_info):
            raise ValueError(f"{type(self).__name__} was built for {len(self.feature_info)} levels "
                             f"{list(self.feature_info)}, got {len(features)} feature maps")


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size=kernel_size, bias=False)


class FCNHead(DecodeHead):
    """Convolutions on one level, then the classifier: the auxiliary head UPerNet trains with.

    >>> info = FeatureInfo(channels=(8, 16), strides=(8, 16), embed_dim=16)
    >>> FCNHead(feature_info=info, num_classes=3, channels=4, level=1)([torch.zeros(1, 8, 4, 4),
    ...                                                                 torch.zeros(1, 16, 2, 2)]).shape
    torch.Size([1, 3, 2, 2])
    """

    def __init__(self, *, feature_info: FeatureInfo, num_classes: int, level: int, channels: int = 256,
                 num_convs: int = 1, dropout: float = 0.1) -> None:
        super().__init__(feature_info=feature_info, num_classes=num_classes, channels=channels, dropout=dropout)
        if not 0 <= level < len(feature_info):
            raise ValueError(f"level must index one of the {len(feature_info)} levels {list(feature_info)}, "
                             f"got {level}")
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.level = level
        widths = [feature_info.channels[level]] + [channels] * num_convs
        self.convs = nn.Sequential(*[_conv(i, o, 3) for i, o in zip(widths[:-1], widths[1:])])

    @property
    def output_stride(self) -> int:
        return self.feature_info.strides[self.level]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(features)
        return self.classifier(self.convs(features[self.level]))


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: average-pool to each scale, 1x1 conv, upsample, concatenate with the input."""

    def __init__(self, *, in_channels: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(in_channels, channels, 1)) for s in scales)
        self.out_channels = in_channels + len(scales) * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [_resize(stage(x), x.shape[-2:]) for stage in self.stages], dim=1)


class UPerNetHead(DecodeHead):
    """UPerNet: pyramid pooling on the coarsest level, a top-down FPN, all levels fused at the finest.

    ``aux_channels`` (``None`` for none) adds an ``FCNHead`` on the stride-``aux_stride`` level.

    >>> info = FeatureInfo(channels=(8, 16, 32, 64), strides=(4, 8, 16, 32), embed_dim=64)
    >>> head = UPerNetHead(feature_info=info, num_classes=3, channels=16, aux_channels=8)
    >>> feats = [torch.zeros(2, c, 32 // s, 32 // s) for c, s in info]
    >>> head(feats).shape, head.aux(feats).shape
    (torch.Size([2, 3, 8, 8]), torch.Size([2, 3, 2, 2]))
    """

    def __init__(self, *, feature_info: FeatureInfo, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_channels: int | None = 256,
                 aux_stride: int = 16) -> None:
        super().__init__(feature_info=feature_info, num_classes=num_classes, channels=channels, dropout=dropout)
        if not pool_scales or min(pool_scales) < 1:
            raise ValueError(f"pool_scales must be a non-empty list of sizes >= 1, got {list(pool_scales)}")
        *fine, coarsest = feature_info.channels
        self.ppm = PyramidPooling(in_channels=coarsest, channels=channels, scales=pool_scales)
        self.ppm_bottleneck = _conv(self.ppm.out_channels, channels, 3)
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in fine)
        self.fpn_out = nn.ModuleList(_conv(channels, channels, 3) for _ in fine)
        self.fuse = _conv(len(feature_info) * channels, channels, 3)
        if aux_channels is not None:
            if aux_stride not in feature_info.strides:
                raise ValueError(f"aux_stride={aux_stride} is not a level's stride {feature_info.strides}; "
                                 f"pick one of them or set aux_channels=null")
            self.aux = FCNHead(feature_info=feature_info, num_classes=num_classes, channels=aux_channels,
                               level=feature_info.strides.index(aux_stride), dropout=dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(features)
        levels = [lat(f) for lat, f in zip(self.lateral, features)]
        levels.append(self.ppm_bottleneck(self.ppm(features[-1])))
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + _resize(levels[i + 1], levels[i].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_out, levels)] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1)))


class SemanticFPNHead(DecodeHead):
    """Panoptic FPN's semantic branch on torchvision's ``FeaturePyramidNetwork``.

    Each level goes through ``log2(stride / finest stride)`` conv-BN-ReLU stages (at least one),
    each followed by 2x bilinear upsampling, so all meet at the finest level and are summed.

    >>> info = FeatureInfo(channels=(8, 16, 32, 64), strides=(4, 8, 16, 32), embed_dim=64)
    >>> head = SemanticFPNHead(feature_info=info, num_classes=3, fpn_channels=16, channels=8)
    >>> head([torch.zeros(2, c, 32 // s, 32 // s) for c, s in info]).shape
    torch.Size([2, 3, 8, 8])
    """

    def __init__(self, *, feature_info: FeatureInfo, num_classes: int, channels: int = 128,
                 fpn_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(feature_info=feature_info, num_classes=num_classes, channels=channels, dropout=dropout)
        self.fpn = FeaturePyramidNetwork(list(feature_info.channels), fpn_channels)
        finest = feature_info.strides[0]
        self.scale_heads = nn.ModuleList()
        for stride in feature_info.strides:
            ups = math.log2(stride / finest)
            if ups != int(ups):
                raise ValueError(f"SemanticFPNHead needs strides that are power-of-two multiples of the finest, "
                                 f"got {feature_info.strides}")
            stages: list[nn.Module] = []
            for k in range(max(1, int(ups))):
                stages.append(_conv(fpn_channels if k == 0 else channels, channels, 3))
                if ups:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*stages))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(features)
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values()
        outs = [head(p) for head, p in zip(self.scale_heads, pyramid)]
        size = outs[0].shape[-2:]
        return self.classifier(torch.stack([_resize(o, size) for o in outs]).sum(0))


class MLPHead(DecodeHead):
    """SegFormer's all-MLP decoder: per-level linear projection, upsample, concatenate, fuse, classify.

    >>> info = FeatureInfo(channels=(8, 16, 32, 64), strides=(4, 8, 16, 32), embed_dim=64)
    >>> head = MLPHead(feature_info=info, num_classes=3, channels=16)
    >>> head([torch.zeros(2, c, 32 // s, 32 // s) for c, s in info]).shape
    torch.Size([2, 3, 8, 8])
    """

    def __init__(self, *, feature_info: FeatureInfo, num_classes: int, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(feature_info=feature_info, num_classes=num_classes, channels=channels, dropout=dropout)
        # a linear layer applied at every pixel is a 1x1 convolution
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in feature_info.channels)
        self.fuse = _conv(len(feature_info) * channels, channels, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(features)
        size = features[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([_resize(p(f), size) for p, f in zip(self.proj, features)], 1)))


_HEAD_CLASSES: dict[str, type[DecodeHead]] = {"upernet": UPerNetHead, "semantic_fpn": SemanticFPNHead,
                                               "mlp": MLPHead}


def build_segmentation_head(kind: str, *, feature_info: FeatureInfo, num_classes: int, **kwargs: Any) -> DecodeHead:
    """The head named ``kind`` (one of ``HEADS``); ``kwargs`` are its widths and options.

    >>> info = FeatureInfo(channels=(8, 16, 32, 64), strides=(4, 8, 16, 32), embed_dim=64)
    >>> type(build_segmentation_head("mlp", feature_info=info, num_classes=3)).__name__
    'MLPHead'
    """
    if kind not in _HEAD_CLASSES:
        raise ValueError(f"unknown segmentation head {kind!r}; choose one of {HEADS}")
    return _HEAD_CLASSES[kind](feature_info=feature_info, num_classes=num_classes, **kwargs)


__all__ = ["HEADS", "DecodeHead", "FCNHead", "UPerNetHead", "SemanticFPNHead", "MLPHead", "build_segmentation_head"]
