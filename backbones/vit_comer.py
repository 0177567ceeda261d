"""ViT-CoMer: a plain ViT plus a convolutional multi-scale branch, talking both ways.

Paper: "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for
Dense Predictions" (Xia et al., CVPR 2024); official code Traffic-X/ViT-CoMer (the ADE20K
segmentation variant, whose parameter counts the paper reports, is followed by ``vit_comer_tiny``
and ``vit_comer_small``). The official COCO detection backbone is another layout: its MRFP is
half as wide (hidden 0.5 x dim) and its CNN tokens do not attend to each other
(``cnn_feature_interaction=False``); ``vit_comer_tiny_det`` and ``vit_comer_small_det`` are that
layout, which its checkpoints need.

The ViT (timm blocks, DeiT-T / ViT-S shapes) is untouched, so plain ViT/DeiT checkpoints load
into it. Beside it:

* the spatial pyramid module ``spm`` (a small CNN) gives tokens at strides 8/16/32 plus a
  stride-4 map;
* every interaction ``interactions.i`` wraps a quarter of the ViT blocks: the multi-receptive
  field module ``mrfp`` (depthwise 3x3 / 5x5 per level) refines the CNN tokens, ``cti_tov``
  injects them into the ViT tokens (multi-scale deformable attention over the three levels,
  resampled to stride 16, gated by ``gamma``), the ViT blocks run, and ``cti_toc`` feeds the
  ViT tokens back into the CNN tokens; the last interaction adds ``extra_CTIs``;
* the four outputs are the CNN levels plus the ViT features resized to each stride, with
  BatchNorm (``norm1..norm4``).

Multi-scale deformable attention is the pure-PyTorch op in ``backbones.ops.ms_deform_attn``.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ._features import Backbone, FeatureInfo, pretrained_cfg_for
from ._registry import register_backbone
from .ops.ms_deform_attn import MSDeformAttn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _level_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Strides 8, 16, 32 of the CNN tokens, for a stride-16 grid of h x w."""
    return [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]


def _reference_points(sizes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Pixel centres of every level, normalised (x, y) in (0, 1): [1, sum(h*w), 1, 2]."""
    points = []
    for h, w in sizes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    return torch.cat(points)[None, :, None]


def _split_levels(tokens: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    """[B, N, C] tokens of the three levels -> three NCHW maps."""
    sizes = _level_sizes(h, w)
    parts = tokens.split([a * b for a, b in sizes], dim=1)
    return [p.transpose(1, 2).reshape(p.shape[0], p.shape[2], a, b) for p, (a, b) in zip(parts, sizes)]


def _merge_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def _add_to_stride16(c: torch.Tensor, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Add the ViT tokens ``x`` (stride 16) to the stride-16 part of the three-level CNN tokens ``c``."""
    c8, c16, c32 = c.split([4 * h * w, h * w, c.shape[1] - 5 * h * w], dim=1)
    return torch.cat([c8, c16 + x, c32], dim=1)


class DWConv(nn.Module):
    """One 3x3 depthwise conv applied to each of the three token levels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return _merge_levels([self.dwconv(m) for m in _split_levels(x, h, w)])


class MultiDWConv(nn.Module):
    """Per level: half the channels through a 3x3, half through a 5x5 depthwise conv, then BN + GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        for lvl in range(3):
            self.add_module(f"dwconv{2 * lvl + 1}", nn.Conv2d(half, half, 3, 1, 1, groups=half))
            self.add_module(f"dwconv{2 * lvl + 2}", nn.Conv2d(half, half, 5, 1, 2, groups=half))
            self.add_module(f"bn{lvl + 1}", nn.BatchNorm2d(dim))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        outs = []
        for lvl, m in enumerate(_split_levels(x, h, w)):
            a, b = m.chunk(2, dim=1)
            small, large = getattr(self, f"dwconv{2 * lvl + 1}"), getattr(self, f"dwconv{2 * lvl + 2}")
            outs.append(self.act(getattr(self, f"bn{lvl + 1}")(torch.cat([small(a), large(b)], dim=1))))
        return _merge_levels(outs)


class ConvFFN(nn.Module):
    """Linear -> depthwise conv on the level maps -> GELU -> linear. ``MRFP`` uses ``MultiDWConv``."""

    def __init__(self, dim: int, hidden: int, *, multi_scale: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = MultiDWConv(hidden) if multi_scale else DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


MRFP = partial(ConvFFN, multi_scale=True)


class MultiscaleExtractor(nn.Module):
    """Deformable attention of the CNN tokens over their own three levels, then a ConvFFN."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 drop_path: float) -> None:
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: torch.Tensor, feat: torch.Tensor, ref: torch.Tensor, h: int, w: int) -> torch.Tensor:
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), _level_sizes(h, w))
        return query + self.drop_path(self.ffn(self.ffn_norm(query), h, w))


class CTIToC(nn.Module):
    """ViT -> CNN: add the ViT tokens to the stride-16 CNN tokens, optionally an FFN, then the
    multi-scale self-interaction (``cfinter``) of the CNN tokens."""

    def __init__(self, dim: int, *, with_ffn: bool, cnn_feature_interaction: bool, cffn_ratio: float,
                 drop_path: float, **attn_kw: Any) -> None:
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        if with_ffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = LayerNorm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.with_ffn = with_ffn
        self.cfinter = MultiscaleExtractor(dim, cffn_ratio=cffn_ratio, drop_path=drop_path, **attn_kw) \
            if cnn_feature_interaction else None

    def forward(self, c: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, h: int, w: int) -> torch.Tensor:
        c = _add_to_stride16(c, x, h, w)
        if self.with_ffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), h, w))
        if self.cfinter is not None:
            c = self.cfinter(self.query_norm(c), self.feat_norm(c), ref, h, w)
        return c


class CTIToV(nn.Module):
    """CNN -> ViT: deformable attention over the three CNN levels, a ConvFFN, the levels resized to
    stride 16 and summed, added to the ViT tokens through ``gamma`` (zero at init)."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 drop_path: float, init_values: float) -> None:
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor, ref: torch.Tensor, h: int, w: int) -> torch.Tensor:
        c = self.attn(self.query_norm(c), ref, self.feat_norm(c), _level_sizes(h, w))
        c = c + self.drop_path(self.ffn(self.ffn_norm(c), h, w))
        c8, c16, c32 = _split_levels(c, h, w)
        c8 = F.interpolate(c8, scale_factor=0.5, mode="bilinear", align_corners=False)
        c32 = F.interpolate(c32, scale_factor=2, mode="bilinear", align_corners=False)
        return x + self.gamma * (c8 + c16 + c32).flatten(2).transpose(1, 2)


class CTIBlock(nn.Module):
    """One interaction: MRFP + CNN->ViT, a run of ViT blocks, ViT->CNN (+ the extra CTIs at the end)."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 mrfp_ratio: float, drop_path: float, init_values: float, cnn_feature_interaction: bool,
                 extra_num: int) -> None:
        super().__init__()
        attn_kw = dict(num_heads=num_heads, n_points=n_points, deform_ratio=deform_ratio)
        self.cti_tov = CTIToV(dim, cffn_ratio=cffn_ratio, drop_path=drop_path, init_values=init_values, **attn_kw)
        self.cti_toc = CTIToC(dim, with_ffn=False, cnn_feature_interaction=cnn_feature_interaction,
                              cffn_ratio=cffn_ratio, drop_path=drop_path, **attn_kw)
        self.extra_CTIs = nn.Sequential(*[
            CTIToC(dim, with_ffn=True, cnn_feature_interaction=cnn_feature_interaction, cffn_ratio=cffn_ratio,
                   drop_path=drop_path, **attn_kw)
            for _ in range(extra_num)
        ]) if extra_num else None
        self.mrfp = MRFP(dim, int(dim * mrfp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor, blocks: nn.Sequential, ref: torch.Tensor,
                h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = _add_to_stride16(self.mrfp(c, h, w), x, h, w)
        x = blocks(self.cti_tov(x, c, ref, h, w))
        c = self.cti_toc(c, x, ref, h, w)
        for cti in self.extra_CTIs or ():
            c = cti(c, x, ref, h, w)
        return x, c


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPyramid(nn.Module):
    """The convolutional branch (official ``CNN``): a ResNet-like stem, then strides 8, 16, 32,
    each projected to the ViT width by a 1x1 conv (``fc1..fc4``)."""

    def __init__(self, inplanes: int, embed_dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1) if self.fc1 is not None else None, self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class ViTCoMer(Backbone):
    """ViT-CoMer backbone: four levels at strides 4, 8, 16, 32, all ``embed_dim`` wide.

    ``embed`` is the global average of the stride-32 level (ViT-CoMer has no classifier of its
    own; ``num_classes > 0`` adds a linear ``head`` on it). Inputs: sides divisible by 32, any
    size (the position embedding, stored for ``img_size``, is resized bicubically).

    >>> m = vit_comer_test()
    >>> [tuple(f.shape) for f in m(torch.zeros(1, 3, 64, 64))]
    [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    """

    family = "hybrid"
    embed_modules = ("head",)  # used by embed() only: dropped by prune_to_features()
    feature_modules = ("spm.fc1", "up", "norm1", "norm2", "norm3")  # unused by embed(): frozen for it

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        init_values: float = 0.0,
        interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11)),
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        mrfp_ratio: float = 6.0,
        cnn_feature_interaction: bool = True,
        extra_num: int = 4,
        num_classes: int = 0,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"ViT-CoMer's pyramid is built around stride-16 ViT tokens; patch_size must be 16, "
                             f"got {patch_size}")
        spans = [tuple(ix) for ix in interaction_indexes]
        if len(spans) != 4 or [i for a, b in spans for i in range(a, b + 1)] != list(range(depth)):
            raise ValueError(f"interaction_indexes must split blocks 0..{depth - 1} into 4 consecutive "
                             f"[first, last] spans (one ViT output per pyramid level), got {spans}")
        self.interaction_indexes = spans
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                      strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=1.0, drop_path=dpr[i],
                  norm_layer=LayerNorm)
            for i in range(depth)
        ])
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPyramid(conv_inplane, embed_dim)
        self.interactions = nn.Sequential(*[
            CTIBlock(embed_dim, num_heads=deform_num_heads, n_points=n_points, deform_ratio=deform_ratio,
                     cffn_ratio=cffn_ratio, mrfp_ratio=mrfp_ratio, drop_path=drop_path_rate,
                     init_values=init_values, cnn_feature_interaction=cnn_feature_interaction,
                     extra_num=extra_num if i == len(spans) - 1 else 0)
            for i in range(len(spans))
        ])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(embed_dim) for _ in range(4))
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None

        self.all_feature_info = FeatureInfo((embed_dim,) * 4, (4, 8, 16, 32), embed_dim)
        self.set_out_indices(out_indices)
        self.pretrained_cfg = pretrained_cfg_for(img_size)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.level_embed)
        for name, m in self.named_modules():
            if name.startswith("blocks"):
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not name.startswith("patch_embed"):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        pos = resample_abs_pos_embed(self.pos_embed, [h, w], num_prefix_tokens=0, antialias=False)
        return x.flatten(2).transpose(1, 2) + pos, h, w

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1, c2, c3, c4 = self.spm(x)
        c = _merge_levels([c2 + self.level_embed[0, :, None, None], c3 + self.level_embed[1, :, None, None],
                           c4 + self.level_embed[2, :, None, None]])
        x, h, w = self._tokens(x)
        ref = _reference_points(_level_sizes(h, w), x.device)
        vit_maps = []
        for layer, (first, last) in zip(self.interactions, self.interaction_indexes):
            x, c = layer(x, c, self.blocks[first:last + 1], ref, h, w)
            vit_maps.append(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        c2, c3, c4 = _split_levels(c, h, w)
        v1, v2, v3, v4 = vit_maps
        stride4 = None  # the stride-4 branch, gone when pruned to coarser levels
        if self.up is not None:
            c1 = self.up(c2) + c1 + F.interpolate(v1, scale_factor=4, mode="bilinear", align_corners=False)
            stride4 = self.norm1(c1)
        c2 = c2 + F.interpolate(v2, scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + v3
        c4 = c4 + F.interpolate(v4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [stride4, self.norm2(c2), self.norm3(c3), self.norm4(c4)]

    def _drop_embed_modules(self) -> None:
        """The pooled head, and the stride-4 branch when no head reads stride 4: under DDP every
        remaining parameter must get a gradient."""
        super()._drop_embed_modules()
        if 0 not in self.out_indices:
            self.spm.fc1 = self.up = self.norm1 = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.forward_levels(x)[-1].mean((2, 3))

    def get_classifier(self) -> nn.Module:
        if self.head is None:
            return super().get_classifier()
        return self.head

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "level_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-wise decay groups as in the official recipe: the patch embedding first, one group per
        ViT block, and everything CoMer-specific (unmatched) in the last group at the full rate."""
        return {"stem": r"^(?:patch_embed|pos_embed)", "blocks": r"^blocks\.(\d+)"}


_PLAIN_VIT_ONLY = re.compile(r"^(cls_token|dist_token|norm\.|fc_norm\.|head_dist\.|pre_logits\.)")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ViTCoMer) -> dict[str, torch.Tensor]:
    """Official ViT-CoMer (mmseg/mmdet ``backbone.*``) or plain timm ViT/DeiT keys -> this model's keys.

    The official ViT keeps a class-token slot in ``pos_embed`` and layer-scale as
    ``blocks.N.gamma1/2``; here ``pos_embed`` is the grid only (resized to the model's) and the
    layer scales are timm's ``ls1/ls2.gamma``. A plain ViT has no layer scale: it is set to ones
    (the identity, as the official code initialises it); its class token, final norm and
    classifier are dropped. Everything CoMer-specific is then missing, for the load report.
    """
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    plain_vit = not any(k.startswith(("spm.", "interactions.")) for k in state_dict)
    grid = model.patch_embed.grid_size
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if (plain_vit and (_PLAIN_VIT_ONLY.match(k) or k.startswith("head."))) or (
                k.startswith("head.") and model.head is None):
            continue
        if k == "pos_embed":
            v = resample_abs_pos_embed(v[:, v.shape[1] - _square_grid(v.shape[1]):], list(grid), num_prefix_tokens=0,
                                       antialias=False)
        k = re.sub(r"^(blocks\.\d+)\.gamma([12])$", r"\1.ls\2.gamma", k)
        out[k] = v
    if plain_vit:
        for k, v in model.state_dict().items():
            if re.match(r"^blocks\.\d+\.ls[12]\.gamma$", k) and k not in out:
                out[k] = torch.ones_like(v, device="cpu")
    return out


def _square_grid(n: int) -> int:
    """The largest square count <= n that leaves at most two prefix tokens (class / distillation)."""
    for prefix in (0, 1, 2):
        side = int(round((n - prefix) ** 0.5))
        if side * side == n - prefix:
            return n - prefix
    raise ValueError(f"pos_embed with {n} tokens is not a square grid plus up to 2 prefix tokens")


def _create_vit_comer(variant: str, **kwargs: Any) -> ViTCoMer:
    model = ViTCoMer(**kwargs)
    model.pretrained_cfg.update(_CFGS[variant])
    return model


# The official ViT-CoMer checkpoints are published on Baidu Pan only; its training starts from
# these DeiT releases, which load into the ViT part.
_DEIT_T = dict(url="https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth", tag="deit_in1k")
_DEIT_S = dict(url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth", tag="deit_in1k")
_CFGS = {"vit_comer_tiny": _DEIT_T, "vit_comer_tiny_det": _DEIT_T, "vit_comer_small": _DEIT_S,
         "vit_comer_small_det": _DEIT_S, "vit_comer_test": dict(url=None)}
# the official detection backbone (detection/mmdet_custom/models/backbones/comer_modules.py)
_DETECTION = {"mrfp_ratio": 0.5, "cnn_feature_interaction": False}


@register_backbone(family="hybrid", tiny=True)
def vit_comer_test(**kw: Any) -> ViTCoMer:
    return _create_vit_comer("vit_comer_test", **{
        "img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2, "conv_inplane": 8, "n_points": 2,
        "deform_num_heads": 2, "interaction_indexes": ((0, 0), (1, 1), (2, 2), (3, 3)), "mrfp_ratio": 1.0,
        "extra_num": 1, **kw})


@register_backbone(family="hybrid")
def vit_comer_tiny(**kw: Any) -> ViTCoMer:
    return _create_vit_comer("vit_comer_tiny", **{
        "embed_dim": 192, "depth": 12, "num_heads": 3, "drop_path_rate": 0.1, **kw})


@register_backbone(family="hybrid")
def vit_comer_small(**kw: Any) -> ViTCoMer:
    return _create_vit_comer("vit_comer_small", **{
        "embed_dim": 384, "depth": 12, "num_heads": 6, "drop_path_rate": 0.2, "mrfp_ratio": 1.5, **kw})


@register_backbone(family="hybrid")
def vit_comer_tiny_det(**kw: Any) -> ViTCoMer:
    return _create_vit_comer("vit_comer_tiny_det", **{
        "embed_dim": 192, "depth": 12, "num_heads": 3, "drop_path_rate": 0.1, **_DETECTION, **kw})


@register_backbone(family="hybrid")
def vit_comer_small_det(**kw: Any) -> ViTCoMer:
    return _create_vit_comer("vit_comer_small_det", **{
        "embed_dim": 384, "depth": 12, "num_heads": 6, "drop_path_rate": 0.2, **_DETECTION, **kw})
