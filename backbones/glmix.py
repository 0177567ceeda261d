"""GLNet: a four-stage network of GLMix blocks, mixing a local conv grid with global attention slots.

Paper: Zhu et al., "Revisiting the Integration of Convolution and Attention for Vision Backbone"
(NeurIPS 2024); official code rayleizhu/GLMix (``models/glnet.py``), whose module names this file
keeps so its checkpoints load as they are.

A GLMix block represents the image twice: as the fine conv grid (a 1x1 -> 5x5 depthwise -> 1x1
"pseudo attention") and as a small set of semantic slots (64 by default). Soft clustering pools
the grid into the slots (cosine similarity to slot seeds pooled from the map, softmax over
pixels), multi-head attention mixes the slots globally, and soft dispatching (softmax over
slots) scatters them back onto the grid. Stage 3 alternates GLMix and plain attention blocks;
stage 4 is plain attention (its map is small).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn

from ._features import Backbone, FeatureInfo, pretrained_cfg_for
from ._registry import register_backbone

MIXING_MODES = ("glmix", "glmix.mha_nchw", "mha_nchw")


class SlotAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_*``,
    ``out_proj``), computed with ``scaled_dot_product_attention`` so FLOP counters see it."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """Per-channel scale; ``channels_first`` keeps the official [1, C, 1, 1] shape for NCHW inputs."""

    def __init__(self, dim: int, init_value: float, *, channels_first: bool) -> None:
        super().__init__()
        shape = (1, dim, 1, 1) if channels_first else (dim,)
        self.gamma = nn.Parameter(torch.full(shape, float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class ResDWConv(nn.Conv2d):
    """x + depthwise 3x3 conv(x), inside the MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(ratio * dim)
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), ResDWConv(hidden), nn.GELU(), nn.Conv2d(hidden, dim, 1))


def _layer_scale(dim: int, value: float, channels_first: bool) -> nn.Module:
    return LayerScale(dim, value, channels_first=channels_first) if value > 0 else nn.Identity()


class GLMixBlock(nn.Module):
    """Conv position encoding, then global (slots) + local (depthwise) mixing, then a conv MLP."""

    def __init__(self, dim: int, *, num_heads: int, num_slots: int, mlp_ratio: float, drop_path: float,
                 layerscale: float, local_dw_ks: int = 5, cpe_ks: int = 3) -> None:
        super().__init__()
        self.pool_size = math.isqrt(num_slots)
        if self.pool_size ** 2 != num_slots:
            raise ValueError(f"num_slots must be a square number (slots are seeded by an adaptive "
                             f"pooling grid), got {num_slots}")
        self.slot_scale = nn.Parameter(torch.tensor(dim ** -0.5))
        self.pos_conv = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.relation_mha = SlotAttention(dim, num_heads)
        self.feature_conv = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.Conv2d(dim, dim, local_dw_ks, padding=local_dw_ks // 2, groups=dim),
            nn.Conv2d(dim, dim, 1),
        )
        self.norm2 = LayerNorm2d(dim)
        self.mlp = _mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls1 = _layer_scale(dim, layerscale, True)
        self.ls2 = _layer_scale(dim, layerscale, True)

    def _mix(self, x: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster the grid into slots, attend among slots, dispatch back; returns (mixed, logits)."""
        pixels = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        logits = F.normalize(seeds, dim=-1) @ (self.slot_scale * F.normalize(pixels, dim=-1)).transpose(1, 2)
        slots = logits.softmax(-1) @ pixels  # soft clustering: [B, S, C]
        slots = self.relation_mha(slots)
        out = logits.transpose(1, 2).softmax(-1) @ slots  # soft dispatching: [B, HW, C]
        return out.transpose(1, 2).reshape_as(x) + self.feature_conv(x), logits

    def forward(self, x: torch.Tensor, *, return_assignment: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        seeds = F.adaptive_avg_pool2d(x, self.pool_size).flatten(2).transpose(1, 2)
        x = x + self.pos_conv(x)
        mixed, logits = self._mix(self.norm1(x), seeds)
        x = x + self.drop_path(self.ls1(mixed))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        if return_assignment:  # each pixel's distribution over the slots, [B, S, H, W]
            return x, logits.softmax(1).view(x.shape[0], -1, *x.shape[2:])
        return x


class MHSABlock(nn.Module):
    """Conv position encoding, full multi-head self-attention over the pixels, conv MLP."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, drop_path: float, layerscale: float,
                 cpe_ks: int = 3) -> None:
        super().__init__()
        self.pos_conv = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mha_op = SlotAttention(dim, num_heads)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = _mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls1 = _layer_scale(dim, layerscale, False)
        self.ls2 = _layer_scale(dim, layerscale, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv(x)
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.drop_path(self.ls1(self.mha_op(self.norm1(tokens))))
        x = tokens.transpose(1, 2).reshape_as(x)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class GLNetStage(nn.Module):
    """``blocks`` of one resolution; ``mode`` picks GLMix, plain attention, or alternating (GLMix first)."""

    def __init__(self, dim: int, depth: int, *, mode: str, drop_path: Sequence[float], num_heads: int,
                 num_slots: int, local_dw_ks: int, mlp_ratio: float, layerscale: float) -> None:
        super().__init__()
        if mode not in MIXING_MODES:
            raise ValueError(f"mixing mode must be one of {MIXING_MODES}, got {mode!r}")
        kw = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, layerscale=layerscale)
        blocks = []
        for i in range(depth):
            glmix = mode == "glmix" or (mode == "glmix.mha_nchw" and i % 2 == 0)
            blocks.append(GLMixBlock(dim, num_slots=num_slots, local_dw_ks=local_dw_ks, drop_path=drop_path[i], **kw)
                          if glmix else MHSABlock(dim, drop_path=drop_path[i], **kw))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class GLNet(Backbone):
    """GLNet backbone: four levels at strides 4, 8, 16, 32; ``embed`` is the BatchNorm-ed,
    average-pooled last level (the official classifier input). ``slots(x)`` gives the clustering.

    >>> m = glnet_test()
    >>> [tuple(f.shape) for f in m(torch.zeros(1, 3, 64, 64))]
    [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    >>> [tuple(a.shape) for a in m.slots(torch.zeros(1, 3, 64, 64))]
    [(1, 4, 16, 16), (1, 4, 8, 8), (1, 4, 4, 4)]
    """

    family = "hybrid"
    embed_modules = ("norm", "head")  # used by embed() only: dropped by prune_to_features()

    def __init__(
        self,
        *,
        depths: Sequence[int] = (4, 4, 18, 4),
        dims: Sequence[int] = (64, 128, 256, 512),
        mlp_ratio: float = 3.0,
        head_dim: int = 32,
        mixing_modes: Sequence[str] = ("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"),
        num_slots: int = 64,
        local_dw_ks: int = 5,
        layerscale: float = -1.0,
        drop_path_rate: float = 0.0,
        img_size: int = 224,
        num_classes: int = 0,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4 or len(mixing_modes) != 4:
            raise ValueError(f"GLNet has 4 stages: depths, dims and mixing_modes need 4 entries each, got "
                             f"depths={tuple(depths)} dims={tuple(dims)} mixing_modes={tuple(mixing_modes)}")
        if any(d % head_dim for d in dims):
            raise ValueError(f"every dim must be divisible by head_dim={head_dim}, got dims={tuple(dims)}")
        # official layout: index 0 is an (unused) input norm slot, kept so checkpoint indices match
        stem = nn.Sequential(
            nn.Identity(),
            nn.Conv2d(3, dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(dims[0] // 2), nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1), nn.BatchNorm2d(dims[i + 1])) for i in range(3)
        ])
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear decay rule
        self.stages = nn.ModuleList([
            GLNetStage(dims[i], depths[i], mode=mixing_modes[i], drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                       num_heads=dims[i] // head_dim, num_slots=num_slots, local_dw_ks=local_dw_ks,
                       mlp_ratio=mlp_ratio, layerscale=layerscale)
            for i in range(4)
        ])
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else None
        self.num_classes = num_classes
        self.all_feature_info = FeatureInfo(tuple(dims), (4, 8, 16, 32), dims[-1])
        self.set_out_indices(out_indices)
        self.pretrained_cfg = pretrained_cfg_for(img_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            levels.append(x)
        return levels

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.norm(self.forward_levels(x)[-1]).mean((2, 3))

    @torch.no_grad()
    def slots(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Soft clustering of every GLMix block: [B, num_slots, H, W] per block, each pixel's
        distribution over the slots (sums to 1 over dim 1), in network order."""
        self.check_input_size(x.shape[-2], x.shape[-1])
        maps = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)
            for blk in stage.blocks:
                if isinstance(blk, GLMixBlock):
                    x, assignment = blk(x, return_assignment=True)
                    maps.append(assignment)
                else:
                    x = blk(x)
        return maps

    def get_classifier(self) -> nn.Module:
        if self.head is None:
            return super().get_classifier()
        return self.head

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("slot_scale")}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-wise decay groups: the stem, then each block (each stage when ``coarse``), the
        downsampling convs with the stage they open, the final norm last."""
        return {
            "stem": r"^downsample_layers\.0\.",
            "blocks": r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^norm\.", (99999,)),
            ],
        }


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: GLNet) -> dict[str, torch.Tensor]:
    """The official keys are this model's keys; only the classifier is dropped when not built."""
    if model.head is None:
        return {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return dict(state_dict)


# Official ImageNet-1k checkpoints (rayleizhu/GLMix README / models/glnet.py); glnet_16g's is the EMA.
# Stochastic depth defaults are the official training recipe's (0.15 / 0.3 / 0.4).
_URLS = {
    "glnet_4g": "https://api.onedrive.com/v1.0/shares/u!aHR0cHM6Ly8xZHJ2Lm1zL3UvcyFBa0JiY3pkUmxadkN5RzlEalNfQU1xbkpRaVgxP2U9dE9raEhQ/root/content",  # noqa: E501
    "glnet_9g": "https://api.onedrive.com/v1.0/shares/u!aHR0cHM6Ly8xZHJ2Lm1zL3UvcyFBa0JiY3pkUmxadkN5RUdGUTZrZldWLXdWWmVpP2U9d1d3Ujh6/root/content",  # noqa: E501
    "glnet_16g": "https://api.onedrive.com/v1.0/shares/u!aHR0cHM6Ly8xZHJ2Lm1zL3UvcyFBa0JiY3pkUmxadkN5amFCeEMzaC1COENIV01tP2U9R2ZSMGtn/root/content",  # noqa: E501
}


# Releases evaluated with their EMA weights: a checkpoint holding both gives these.
_EMA_RELEASES = {"glnet_16g"}


def _create_glnet(variant: str, **kwargs: Any) -> GLNet:
    model = GLNet(**kwargs)
    model.pretrained_cfg.update(url=_URLS.get(variant), tag="in1k" if variant in _URLS else None)
    if variant in _EMA_RELEASES:
        model.pretrained_cfg.update(state_dict_key="model_ema")
    return model


@register_backbone(family="hybrid", tiny=True)
def glnet_test(**kw: Any) -> GLNet:
    return _create_glnet("glnet_test", **{
        "depths": (1, 1, 2, 1), "dims": (16, 32, 64, 128), "head_dim": 16, "num_slots": 4, **kw})


@register_backbone(family="hybrid")
def glnet_4g(**kw: Any) -> GLNet:
    return _create_glnet("glnet_4g", **{
        "depths": (4, 4, 18, 4), "dims": (64, 128, 256, 512), "drop_path_rate": 0.15, **kw})


@register_backbone(family="hybrid")
def glnet_9g(**kw: Any) -> GLNet:
    return _create_glnet("glnet_9g", **{
        "depths": (4, 4, 18, 4), "dims": (96, 192, 384, 768), "drop_path_rate": 0.3, **kw})


@register_backbone(family="hybrid")
def glnet_16g(**kw: Any) -> GLNet:
    return _create_glnet("glnet_16g", **{
        "depths": (4, 4, 18, 4), "dims": (128, 256, 512, 1024), "layerscale": 1e-4, "drop_path_rate": 0.4, **kw})
