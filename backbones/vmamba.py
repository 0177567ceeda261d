"""VMamba: a four-stage hierarchy of visual state-space blocks with 2D cross-scan (SS2D).

Paper: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024); official code
MzeroMiko/VMamba (``classification/models/vmamba.py``). The released "v2" models
(``configs/vssm/vmambav2_{tiny,small,base}_224.yaml``: ``vssm1_tiny_0230``, ``vssm1_small_0229``,
``vssm1_base_0229``) are followed: forward type ``v05_noz`` (no gate branch), d_state 1,
ssm_ratio 2, a depthwise 3x3 conv before the scan, channels-first LayerNorms (``ln2d``), the
two-conv stem (``patchembed v2``) and 3x3 stride-2 conv downsampling (``downsample v3``).

SS2D reads the feature map along four routes (row-major, column-major and both reversed), runs
one selective scan per route with its own parameters (one grouped call of
``backbones.ops.selective_scan``), and sums the four results back onto the grid.

Levels are the four stage outputs (strides 4, 8, 16, 32) before each downsampling, as in the
official detection backbone; ``embed(x)`` is the classifier's norm + global average pool.
``out_norm=True`` adds the official detection/segmentation backbone's channels-first LayerNorm
on every level (``outnorm0..3``, mmdet/mmseg ``Backbone_VSSM``), which its checkpoints need.

Two tiny layouts are released: ``vmamba_tiny`` is the s2l5 model (depths 2-2-5-2, ssm_ratio 2,
``vssm_tiny_0230``) and ``vmamba_tiny_s1l8`` the current VMamba-T (depths 2-2-8-2, ssm_ratio 1,
``vssm1_tiny_0230s``).

>>> from backbones import create_backbone
>>> model = create_backbone("vmamba_test")
>>> [tuple(f.shape) for f in model(torch.zeros(1, 3, 64, 64))]
[(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Sequence

import torch
import timm.layers
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ._features import Backbone, FeatureInfo, pretrained_cfg_for
from ._registry import register_backbone
from .ops import scan_cpu
from .ops.activation import GELU
from .ops.conv import Conv2d
from .ops.selective_scan import init_a_log, init_dt_bias, selective_scan

ROUTES = 4  # row-major, column-major, and both reversed


# the official ``ln2d``: a channels-first LayerNorm with nn.LayerNorm's eps (timm's permutes, so a
# channels-last map is normalized without a copy)
LayerNorm2d = partial(timm.layers.LayerNorm2d, eps=1e-5)


class Linear2d(nn.Linear):
    """A linear layer on the channels of an NCHW map (``nn.Linear``'s weight shape): one GEMM on a
    channels-last map, which it returns channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _copy_routes(grid: torch.Tensor, seq: torch.Tensor, *, to_seq: bool) -> None:
    """Copy each route between slice k of ``grid`` [B, H, W, 4, C] and slice k of ``seq`` [B, H*W, 4, C]
    (route order), in the direction ``to_seq`` says: one strided copy per route, reversed routes flipped."""
    for k in range(ROUTES):
        g = grid[:, :, :, k] if k % 2 == 0 else grid[:, :, :, k].transpose(1, 2)  # row- or column-major
        s = seq[:, :, k].view(g.shape)
        dst, src = (s, g) if to_seq else (g, s)
        dst.copy_(src.flip(1, 2) if k >= 2 else src)


def _to_routes(x: torch.Tensor) -> torch.Tensor:
    """``cross_scan``'s copies: [B, H, W, C] (shared) or [B, H, W, 4, C] -> [B, H*W, 4, C]."""
    lib = scan_cpu.kernel_for(x) if x.ndim == 4 else None
    if lib is not None:  # a shared map: one pass
        return scan_cpu.cross_scan(lib, x)
    b, h, w, *_, c = x.shape
    seq = x.new_empty(b, h * w, ROUTES, c)
    _copy_routes(x[:, :, :, None].expand(b, h, w, ROUTES, c) if x.ndim == 4 else x, seq, to_seq=True)
    return seq


def _merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``cross_merge``'s sum: [B, H*W, 4, C] -> [B, H, W, C] (one pass with the compiled kernels)."""
    lib = scan_cpu.kernel_for(ys)
    if lib is not None:
        return scan_cpu.cross_merge(lib, ys, h, w)
    b, _, _, c = ys.shape
    rows = ys[:, :, 0] + ys[:, :, 2].flip(1)
    cols = ys[:, :, 1] + ys[:, :, 3].flip(1)
    return rows.view(b, h, w, c) + cols.view(b, w, h, c).transpose(1, 2)


class _CrossScan(torch.autograd.Function):
    """``cross_scan``; its gradient is the reverse reordering: the routes' sum (``_merge``) for a shared map,
    copies back for per-route channels."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _to_routes(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.grid, ctx.shared = inputs[0].shape[1:3], inputs[0].ndim == 4

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if ctx.shared:
            return _merge(grad, *ctx.grid)
        b, _, routes, c = grad.shape
        out = grad.new_empty(b, *ctx.grid, routes, c)
        _copy_routes(out, grad, to_seq=False)
        return out


class _CrossMerge(torch.autograd.Function):
    """``cross_merge``; its gradient is the shared map's ``cross_scan``: the same gradient to every route."""

    @staticmethod
    def forward(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return _merge(ys, h, w)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _to_routes(grad), None, None


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] or [B, H, W, 4, C] -> [B, H*W, 4, C] (time-major): route k's tokens in its order:
    row-major, column-major, and both reversed. A [B, H, W, C] map is shared by the routes; with a
    route dim, route k reads channel slice k, so one call orders a per-route projection. Each route
    is copied once into its slice of the result; the gradient comes back by the adjoint reordering."""
    return _CrossScan.apply(x)


def cross_merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H*W, 4, C] -> [B, H, W, C]: the four routes put back on the grid and summed (the adjoint of
    ``cross_scan`` on a shared map, which its gradient is)."""
    return _CrossMerge.apply(ys, h, w)


class _RouteDt(torch.autograd.Function):
    """``einsum("blkr,kdr->blkd", dt, weight)``: route k's low-rank dt [B, L, 4, R] through its own [D, R]
    projection. The einsum's own backward runs batched products with an output R (6 to 48) wide,
    which MKL runs 2-4x slower at VMamba-T's first stage than these, with the rank as the rows."""

    @staticmethod
    def forward(dt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # under autocast dt is already in the lower precision, as the einsum's product would be
        return torch.einsum("blkr,kdr->blkd", dt, weight.to(dt.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt, weight = ctx.saved_tensors
        b, l, routes, r = dt.shape
        by_route = grad.to(dt.dtype).reshape(b * l, routes, -1).permute(1, 2, 0)  # [4, D, BL]
        grad_dt = torch.bmm(weight.to(dt.dtype).transpose(1, 2), by_route)  # [4, R, BL]
        grad_weight = torch.bmm(dt.reshape(b * l, routes, r).permute(1, 2, 0), by_route.transpose(1, 2))  # [4, R, D]
        grad_weight = grad_weight.transpose(1, 2).to(weight.dtype).contiguous()
        return grad_dt.permute(2, 0, 1).view(b, l, routes, r), grad_weight


class SS2D(nn.Module):
    """2D selective scan: in_proj, depthwise conv + SiLU, four-route selective scan, out_norm, out_proj.

    Parameter names and shapes are the official ones: ``x_proj_weight`` [4, R + 2N, D],
    ``dt_projs_weight`` [4, D, R], ``dt_projs_bias`` [4, D], ``A_logs`` [4D, N], ``Ds`` [4D].
    It works on channels-last maps: the projections are GEMMs on the tokens, and the four routes
    are laid out time-major [B, L, 4, D], the scan kernel's layout. A token's x projection does not
    depend on the route, so all four are one GEMM over the tokens in row-major order, and only
    their few output channels are reordered per route.
    """

    def __init__(self, dim: int, *, d_state: int = 1, ssm_ratio: float = 2.0, d_conv: int = 3) -> None:
        super().__init__()
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = Linear2d(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=False)
        self.x_proj_weight = nn.Parameter(torch.empty(ROUTES, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(ROUTES, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(init_dt_bias(ROUTES, d_inner))
        self.A_logs = nn.Parameter(init_a_log(ROUTES * d_inner, d_state))
        self.Ds = nn.Parameter(torch.ones(ROUTES * d_inner))
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = Linear2d(d_inner, dim, bias=False)
        bound = d_inner ** -0.5  # nn.Linear's default for the four x projections, Mamba's for dt
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv2d(self.in_proj(x))).permute(0, 2, 3, 1)  # [B, H, W, D]
        proj = F.linear(x, self.x_proj_weight.flatten(0, 1)).unflatten(-1, (ROUTES, -1))  # [B, H, W, 4, R + 2N]
        lib = scan_cpu.kernel() if x.device.type == "cpu" and torch.is_inference_mode_enabled() else None
        y = self._scan_routes(lib, x, proj) if lib is not None else self._scan(x, proj)
        return self.out_proj(self.out_norm(y.permute(0, 3, 1, 2)))

    def _scan(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """The four routes copied into one time-major sequence, one differentiable grouped scan, summed back."""
        b, h, w, d = x.shape
        dt, B, C = cross_scan(proj).split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # [B, L, 4, *]
        dt = _RouteDt.apply(dt, self.dt_projs_weight)
        xs = cross_scan(x)  # [B, L, 4, D]
        ys = selective_scan(xs.flatten(2).transpose(1, 2), dt.flatten(2).transpose(1, 2),
                            -torch.exp(self.A_logs.float()), B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1),
                            self.Ds.float(), delta_bias=self.dt_projs_bias.flatten().float(), delta_softplus=True)
        return cross_merge(ys.transpose(1, 2).view(b, h * w, ROUTES, d), h, w)

    def _scan_routes(self, lib, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """Inference: each route scanned by the CPU kernel straight through the map, summed into one output.

        Route k is a view of the channels-last map ([B, H, W, *], or its transpose for the
        column-major routes, read backwards for the reversed ones), so nothing is reordered; the
        routes after the first add their output into the first's. dt is projected in grid order, a
        route at a time (one buffer reused, not a fresh one four times the size). Same result as
        ``_scan`` up to the order of the sum.
        """
        b, h, w, d = x.shape
        r, n = self.dt_rank, self.d_state
        A = -torch.exp(self.A_logs.float()).view(ROUTES, d, n)
        D, bias = self.Ds.float().view(ROUTES, d), self.dt_projs_bias.float()
        y, state = x.new_empty(b, h, w, d, dtype=torch.float32), x.new_empty(b, n, d, dtype=torch.float32)
        for k in range(ROUTES):
            route = (lambda t: t.transpose(1, 2)) if k % 2 else (lambda t: t)  # row- or column-major
            dt = F.linear(proj[..., k, :r], self.dt_projs_weight[k])  # [B, H, W, D]
            scan_cpu.scan_grid(lib, route(x), route(dt), A[k], route(proj[..., k, None, r:r + n]),
                               route(proj[..., k, None, r + n:]), state.zero_(), D=D[k], delta_bias=bias[k],
                               delta_softplus=True, reverse=k >= 2, out=route(y), accumulate=k > 0)
        return y.to(x.dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = GELU()  # nn.GELU's function; the compiled kernel on fp32 CPU tensors
        self.fc2 = Linear2d(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """x + SS2D(norm(x)), then x + MLP(norm2(x)), channels-first."""

    def __init__(self, dim: int, *, d_state: int, ssm_ratio: float, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvNorm(nn.Module):
    """3x3 stride-2 conv then a channels-first LayerNorm (the downsampling between stages)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Stem(nn.Module):
    """Two 3x3 stride-2 convs with a norm and GELU between them: the stride-4 patch embedding."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_chans, dim // 2, 3, 2, 1)
        self.norm1 = LayerNorm2d(dim // 2)
        self.act = GELU()
        self.conv2 = Conv2d(dim // 2, dim, 3, 2, 1)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Stage(nn.Module):
    """A stage's blocks and the downsampling after them (applied by ``VMamba.forward_levels``)."""

    def __init__(self, dim: int, out_dim: int | None, *, depth: int, drop_path: Sequence[float],
                 **block_args: Any) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[VSSBlock(dim, drop_path=drop_path[i], **block_args) for i in range(depth)])
        self.downsample = ConvNorm(dim, out_dim) if out_dim else nn.Identity()


class VMamba(Backbone):
    """VMamba (v2): stem, four stages of VSS blocks at strides 4-32, classifier norm (+ head).

    ``dims`` is the first stage's width (doubled at every stage) or the four widths. Any input
    size divisible by 32 works; ``img_size`` only sets the size in ``pretrained_cfg``.
    """

    family = "state-space"
    embed_modules = ("classifier",)  # used by embed() only: dropped by prune_to_features()

    def __init__(self, *, depths: Sequence[int] = (2, 2, 5, 2), dims: int | Sequence[int] = 96, d_state: int = 1,
                 ssm_ratio: float = 2.0, mlp_ratio: float = 4.0, in_chans: int = 3, num_classes: int = 0,
                 drop_path_rate: float = 0.0, img_size: int = 224, out_indices: Sequence[int] | None = None,
                 out_norm: bool = False) -> None:
        super().__init__()
        dims = [dims * 2 ** i for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        if len(dims) != len(depths):
            raise ValueError(f"dims and depths need one entry per stage, got dims={dims} depths={list(depths)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.patch_embed = Stem(in_chans, dims[0])
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList(
            Stage(dims[i], dims[i + 1] if i + 1 < len(dims) else None, depth=depths[i],
                  drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], d_state=d_state, ssm_ratio=ssm_ratio,
                  mlp_ratio=mlp_ratio)
            for i in range(len(depths)))
        self.classifier = nn.ModuleDict({"norm": LayerNorm2d(dims[-1])})
        if num_classes:
            self.classifier["head"] = nn.Linear(dims[-1], num_classes)
        self.num_classes = num_classes
        self.out_norm = out_norm
        if out_norm:  # official module names, so mmdet/mmseg checkpoints load as they are
            for i, d in enumerate(dims):
                self.add_module(f"outnorm{i}", LayerNorm2d(d))
        self.all_feature_info = FeatureInfo(tuple(dims), tuple(4 * 2 ** i for i in range(len(dims))), dims[-1])
        self.set_out_indices(out_indices)
        self.input_multiple = 4 * 2 ** (len(dims) - 1)
        self.pretrained_cfg = pretrained_cfg_for(img_size, classifier="classifier.head")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """The SSM's A and D, kept out of weight decay officially."""
        return {n for n, _ in self.named_parameters() if n.endswith((".A_logs", ".Ds"))}

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output before its downsampling (no ``outnorm``)."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # channels-last throughout
        levels = []
        for stage in self.layers:
            x = stage.blocks(x)
            levels.append(x)
            x = stage.downsample(x)
        return levels

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self.stage_outputs(x)
        if self.out_norm:
            levels = [getattr(self, f"outnorm{i}")(y) for i, y in enumerate(levels)]
        return levels

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.classifier.norm(self.stage_outputs(x)[-1]).mean((2, 3))

    def get_classifier(self) -> nn.Module:
        if not self.num_classes:
            return super().get_classifier()
        return self.classifier.head


_OFFICIAL_RENAMES = (
    (r"^patch_embed\.0\.", "patch_embed.conv1."),
    (r"^patch_embed\.2\.", "patch_embed.norm1."),
    (r"^patch_embed\.5\.", "patch_embed.conv2."),
    (r"^patch_embed\.7\.", "patch_embed.norm2."),
    (r"^(layers\.\d+\.downsample)\.1\.", r"\1.conv."),
    (r"^(layers\.\d+\.downsample)\.3\.", r"\1.norm."),
)


_OUTNORM = re.compile(r"^outnorm\d+\.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VMamba) -> dict[str, torch.Tensor]:
    """Official MzeroMiko/VMamba keys -> this model's: index-named Sequentials become named modules.

    Between the classification layout and the detection/segmentation one (``outnorm{i}``, no
    classifier), what one side lacks keeps the model's initialization, as the official code does
    when it starts a dense backbone from a classification checkpoint: fresh ``outnorm`` levels for
    a classification checkpoint, the classifier norm for a dense one. A dense checkpoint into a
    model without ``out_norm`` is refused: its levels would miss their norms.
    """
    dense = any(_OUTNORM.match(k) for k in state_dict)
    if dense and not model.out_norm:
        raise ValueError("this is an official VMamba detection/segmentation checkpoint: its levels are normalized "
                         "by outnorm0-3, which the model lacks; build it with out_norm=True "
                         "(create_backbone(..., out_norm=True), or +backbone.out_norm=true from Hydra)")
    out = {}
    for k, v in state_dict.items():
        if k.startswith("classifier.head.") and not model.num_classes:
            continue
        for pattern, repl in _OFFICIAL_RENAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    own = model.state_dict()
    fill = _OUTNORM if not dense else re.compile(r"^classifier\.norm\.")
    out.update({k: v for k, v in own.items() if fill.match(k) and k not in out})
    return out


def _create_vmamba(variant: str, **kwargs: Any) -> VMamba:
    model = VMamba(**kwargs)
    model.pretrained_cfg.update(url=_URLS.get(variant), tag="in1k" if variant in _URLS else None)
    return model


# ImageNet-1k releases of the v2 models (github.com/MzeroMiko/VMamba): the current ones in the
# #v2cls release (README "Classification on ImageNet-1K"), the s2l5 tiny in #20240316.
_RELEASE = "https://github.com/MzeroMiko/VMamba/releases/download/"
_URLS = {
    "vmamba_tiny": _RELEASE + "%2320240316/vssm_tiny_0230_ckpt_epoch_262.pth",
    "vmamba_tiny_s1l8": _RELEASE + "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "vmamba_small": _RELEASE + "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth",
    "vmamba_base": _RELEASE + "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth",
}


@register_backbone(family="state-space", tiny=True)
def vmamba_test(**kw: Any) -> VMamba:
    return _create_vmamba("vmamba_test", **{"depths": (1, 1, 1, 1), "dims": 16, **kw})


@register_backbone(family="state-space")
def vmamba_tiny(**kw: Any) -> VMamba:
    return _create_vmamba("vmamba_tiny", **{"depths": (2, 2, 5, 2), "dims": 96, **kw})


@register_backbone(family="state-space")
def vmamba_tiny_s1l8(**kw: Any) -> VMamba:
    return _create_vmamba("vmamba_tiny_s1l8", **{"depths": (2, 2, 8, 2), "dims": 96, "ssm_ratio": 1.0, **kw})


@register_backbone(family="state-space")
def vmamba_small(**kw: Any) -> VMamba:
    return _create_vmamba("vmamba_small", **{"depths": (2, 2, 15, 2), "dims": 96, **kw})


@register_backbone(family="state-space")
def vmamba_base(**kw: Any) -> VMamba:
    return _create_vmamba("vmamba_base", **{"depths": (2, 2, 15, 2), "dims": 128, **kw})
