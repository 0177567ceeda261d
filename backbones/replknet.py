"""RepLKNet (Ding et al., CVPR 2022, arXiv:2203.06717): 31x31 depthwise kernels, natively.

A conv stem (stride 4), then four stages joined by transitions (1x1 conv, then a stride-2
depthwise 3x3). Each stage alternates a *RepLK block* (BN -> 1x1 -> large depthwise kernel ->
ReLU -> 1x1, residual) and a *ConvFFN* (BN -> 1x1 -> GELU -> 1x1, residual). Kernels are 31, 29,
27, 13 for RepLKNet-31B/L.

**Structural reparameterization.** In train form each large kernel has a parallel 5x5 depthwise
branch, both followed by BatchNorm. ``reparameterize()`` (also reached by
``timm.utils.reparameterize_model``) merges them into one large kernel with a bias
(``large_kernel.lkb_reparam``, the official deploy layout); ``deploy=True`` builds that form.

>>> from backbones import create_backbone
>>> m = create_backbone("replknet_test").eval()
>>> [tuple(f.shape[1:]) for f in m(torch.zeros(1, 3, 64, 64))]
[(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from timm.layers import DropPath
from torch import nn

from ._features import Backbone, FeatureInfo, pretrained_cfg_for
from ._registry import register_backbone
from .ops.large_kernel import DepthwiseConv2d, center_pad, pop_conv_bn


class ConvBN(nn.Sequential):
    """``conv`` -> ``bn`` (-> ReLU): the official conv_bn / conv_bn_relu, same keys."""

    def __init__(self, conv: nn.Conv2d, *, relu: bool = False) -> None:
        layers = OrderedDict(conv=conv, bn=nn.BatchNorm2d(conv.out_channels))
        if relu:
            layers["nonlinear"] = nn.ReLU()
        super().__init__(layers)


def _conv(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False)


def _large_kernel_to_deploy(state: dict[str, torch.Tensor], prefix: str, kernel_size: int) -> None:
    """Rewrite one ``ReparamLargeKernelConv``'s train-form entries of ``state`` into ``lkb_reparam``."""
    w, b = pop_conv_bn(state, f"{prefix}lkb_origin")
    if f"{prefix}small_conv.conv.weight" in state:
        sw, sb = pop_conv_bn(state, f"{prefix}small_conv")
        w, b = w + center_pad(sw, kernel_size), b + sb
    state[f"{prefix}lkb_reparam.weight"] = w
    state[f"{prefix}lkb_reparam.bias"] = b


class ReparamLargeKernelConv(nn.Module):
    """Depthwise large kernel + BN, with an optional parallel small-kernel depthwise conv + BN (train form)."""

    def __init__(self, channels: int, kernel_size: int, *, small_kernel: int | None = 5, deploy: bool = False) -> None:
        super().__init__()
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError(f"small_kernel ({small_kernel}) must not exceed kernel_size ({kernel_size})")
        self.kernel_size, self.small_kernel, self.deploy = kernel_size, small_kernel, deploy
        if deploy:
            self.lkb_reparam = DepthwiseConv2d(channels, kernel_size, bias=True)
        else:
            self.lkb_origin = ConvBN(DepthwiseConv2d(channels, kernel_size))
            if small_kernel is not None:
                self.small_conv = ConvBN(DepthwiseConv2d(channels, small_kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if self.small_kernel is not None:
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge both branches and their BNs into ``lkb_reparam`` (same eval-mode function); no-op in deploy form."""
        if self.deploy:
            return
        state = dict(self.state_dict())
        _large_kernel_to_deploy(state, "", self.kernel_size)
        del self.lkb_origin
        if self.small_kernel is not None:
            del self.small_conv
        with torch.device("meta"):
            self.lkb_reparam = DepthwiseConv2d(state["lkb_reparam.weight"].shape[0], self.kernel_size, bias=True)
        self.load_state_dict(state, assign=True)
        self.deploy = True


class RepLKBlock(nn.Module):
    """BN -> 1x1 conv-BN-ReLU -> large kernel -> ReLU -> 1x1 conv-BN, residual."""

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, *, small_kernel: int | None,
                 drop_path: float = 0.0, deploy: bool = False) -> None:
        super().__init__()
        self.prelkb_bn = nn.BatchNorm2d(channels)
        self.pw1 = ConvBN(_conv(channels, dw_channels, 1), relu=True)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernel=small_kernel, deploy=deploy)
        self.lk_nonlinear = nn.ReLU()
        self.pw2 = ConvBN(_conv(dw_channels, channels, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x))))
        return x + self.drop_path(self.pw2(y))


class ConvFFN(nn.Module):
    """BN -> 1x1 conv-BN -> GELU -> 1x1 conv-BN, residual."""

    def __init__(self, channels: int, hidden: int, *, drop_path: float = 0.0) -> None:
        super().__init__()
        self.preffn_bn = nn.BatchNorm2d(channels)
        self.pw1 = ConvBN(_conv(channels, hidden, 1))
        self.nonlinear = nn.GELU()
        self.pw2 = ConvBN(_conv(hidden, channels, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    """``num_blocks`` (RepLK block, ConvFFN) pairs, stored flat in ``blocks`` as in the official code."""

    def __init__(self, channels: int, num_blocks: int, kernel_size: int, *, drop_path: Sequence[float],
                 small_kernel: int | None, dw_ratio: float, ffn_ratio: float, deploy: bool) -> None:
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel=small_kernel,
                                     drop_path=drop_path[i], deploy=deploy))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path=drop_path[i]))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class RepLKNet(Backbone):
    """RepLKNet backbone; ``embed`` is the official pooling (BatchNorm, then global average).

    >>> m = RepLKNet(large_kernel_sizes=(7, 7, 7, 7), layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    >>> m.embed(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 64])
    """

    family = "large-kernel"
    embed_modules = ("norm", "head")  # used by embed() only: dropped by prune_to_features()

    def __init__(self, *, large_kernel_sizes: Sequence[int], layers: Sequence[int], channels: Sequence[int],
                 small_kernel: int | None = 5, dw_ratio: float = 1.0, ffn_ratio: float = 4.0, in_chans: int = 3,
                 num_classes: int = 0, drop_path_rate: float = 0.0, deploy: bool = False,
                 out_indices: Sequence[int] | None = None, img_size: int | None = None) -> None:
        super().__init__()
        if not len(large_kernel_sizes) == len(layers) == len(channels) == 4:
            raise ValueError(f"RepLKNet has 4 stages: got large_kernel_sizes={tuple(large_kernel_sizes)}, "
                             f"layers={tuple(layers)}, channels={tuple(channels)}")
        self.num_classes = num_classes
        c0 = channels[0]
        self.stem = nn.ModuleList([
            ConvBN(_conv(in_chans, c0, 3, stride=2), relu=True),
            ConvBN(_conv(c0, c0, 3, groups=c0), relu=True),
            ConvBN(_conv(c0, c0, 1), relu=True),
            ConvBN(_conv(c0, c0, 3, stride=2, groups=c0), relu=True)])
        rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, (k, n, c) in enumerate(zip(large_kernel_sizes, layers, channels)):
            start = sum(layers[:i])
            self.stages.append(RepLKNetStage(c, n, k, drop_path=rates[start:start + n], small_kernel=small_kernel,
                                             dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, deploy=deploy))
            if i < 3:
                nxt = channels[i + 1]
                self.transitions.append(nn.Sequential(ConvBN(_conv(c, nxt, 1), relu=True),
                                                      ConvBN(_conv(nxt, nxt, 3, stride=2, groups=nxt), relu=True)))
        self.norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else None

        self.all_feature_info = FeatureInfo(tuple(channels), (4, 8, 16, 32), channels[-1])
        self.set_out_indices(out_indices)
        self.pretrained_cfg = pretrained_cfg_for(img_size or 224, classifier="head")

    @property
    def deploy(self) -> bool:
        """Whether every large kernel is in deploy form."""
        return all(m.deploy for m in self.modules() if isinstance(m, ReparamLargeKernelConv))

    def reparameterize(self) -> None:
        """Merge every large kernel with its small branch and BNs (call in eval mode)."""
        for m in self.modules():
            if isinstance(m, ReparamLargeKernelConv):
                m.reparameterize()

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        for layer in self.stem:
            x = layer(x)
        levels = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            levels.append(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return levels

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.norm(self.forward_levels(x)[-1]).mean((-2, -1))

    def get_classifier(self) -> nn.Module:
        if self.head is None:
            return super().get_classifier()
        return self.head


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: RepLKNet) -> dict[str, torch.Tensor]:
    """Fit an official RepLKNet state dict (train or deploy form) to ``model``.

    The official keys are the model's keys. Drops ``head.*`` when the model has no classifier.
    A train-form checkpoint loaded into a deploy-form model (``deploy=True``) is merged here; a
    deploy-form checkpoint needs a deploy-form model (the merge cannot be undone).
    """
    out = {k: v for k, v in state_dict.items() if model.head is not None or not k.startswith("head.")}
    for name, m in model.named_modules():
        if not isinstance(m, ReparamLargeKernelConv):
            continue
        train_form = f"{name}.lkb_origin.conv.weight" in out
        if train_form and m.deploy:
            _large_kernel_to_deploy(out, f"{name}.", m.kernel_size)
        elif not m.deploy and f"{name}.lkb_reparam.weight" in out:
            raise ValueError(f"the checkpoint is in deploy form ({name}.lkb_reparam); "
                             f"build the model with deploy=True to load it")
    return out


_CHECKPOINTS = {  # variant -> (official ImageNet-1k checkpoint, its resolution, its tag)
    "replknet_31b": ("https://drive.google.com/file/d/1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S/view?usp=sharing", 224, "in1k"),
    "replknet_31l": ("https://drive.google.com/file/d/1JYXoNHuRvC33QV1pmpzMTKEni1hpWfBl/view?usp=sharing", 384,
                     "in22k_ft_in1k_384"),
}


def _create_replknet(variant: str, **kwargs: Any) -> RepLKNet:
    model = RepLKNet(**kwargs)
    if variant in _CHECKPOINTS:
        url, size, tag = _CHECKPOINTS[variant]
        model.pretrained_cfg = pretrained_cfg_for(kwargs.get("img_size") or size, url=url, tag=tag, classifier="head",
                                                  crop_pct=0.875 if size == 224 else 1.0)
    return model


@register_backbone(family="large-kernel", tiny=True)
def replknet_test(**kwargs: Any) -> RepLKNet:
    args = dict(large_kernel_sizes=(31, 29, 27, 13), layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
    return _create_replknet("replknet_test", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def replknet_31b(**kwargs: Any) -> RepLKNet:
    args = dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024))
    return _create_replknet("replknet_31b", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def replknet_31l(**kwargs: Any) -> RepLKNet:
    args = dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(192, 384, 768, 1536))
    return _create_replknet("replknet_31l", **{**args, **kwargs})
