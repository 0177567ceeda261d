"""UniRepLKNet (Ding et al., CVPR 2024, arXiv:2311.15599): a large-kernel ConvNet, natively.

Four stages at strides 4-32. Each block is ``x + gamma * BN(W2 GRN(GELU(W1 SE(BN(dwconv(x))))))``
where ``dwconv`` is a depthwise 3x3 (stage 1 and the interleaved small blocks) or a 13x13
*Dilated Reparam Block*: the 13x13 kernel plus parallel dilated depthwise branches
(5x5 d1, 7x7 d2, 3x3 d3, 3x3 d4, 3x3 d5), each followed by BatchNorm.

**Structural reparameterization.** ``reparameterize()`` (also reached by
``timm.utils.reparameterize_model``) turns each block into its deploy form: the dilated branches
and every BatchNorm merge into one 13x13 kernel with a bias, the GRN bias and the last BatchNorm
and layer scale fold into ``pwconv2``. In eval mode both forms compute the same function.
``deploy=True`` builds the deploy form directly, e.g. to load deploy-form checkpoints.

>>> from backbones import create_backbone
>>> m = create_backbone("unireplknet_test").eval()
>>> [tuple(f.shape[1:]) for f in m(torch.zeros(1, 3, 64, 64))]
[(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
>>> m.reparameterize(); m.deploy
True
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn
from torch.utils import flop_counter

from ._features import Backbone, FeatureInfo, pretrained_cfg_for
from ._registry import register_backbone
from .ops import autotune, scan_cpu
from .ops.derived import derived
from .ops.large_kernel import CPU_NCHW_MAX_KERNEL, DepthwiseConv2d, center_pad, dilate_kernel, pop_bn

# kernel size -> the parallel (kernel, dilation) branches of its Dilated Reparam Block (official defaults)
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}
SMALL_KERNELS = (3, 5)  # plain depthwise convs, no dilated branches

# oneDNN's linear with a fused GELU or residual add, the op PyTorch's CPU compiler emits for these
# patterns; absent without oneDNN, where inference takes the general path
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _onednn_linear_flops(x_shape: Sequence[int], *args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
    """FLOPs of ``_ONEDNN_LINEAR`` for ``torch.utils.flop_counter`` (2 x multiply-adds, as its ``mm``)."""
    return 2 * math.prod(out_shape) * x_shape[-1]


if _ONEDNN_LINEAR is not None and _ONEDNN_LINEAR not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_ONEDNN_LINEAR)(_onednn_linear_flops)


def nchw_kernel(kernel_size: int) -> bool:
    """Whether a stage with a depthwise ``kernel_size`` conv trains in NCHW on CPU: 5-13, where NCHW convs are
    fast on some CPUs (AVX-512: 1.3-2.3x channels-last's at 13x13). Each conv still runs in the layout
    ``tuned_strategy`` measures fastest on this CPU, converting its input where that differs."""
    return 3 < kernel_size <= CPU_NCHW_MAX_KERNEL


def fused_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` computes ``x`` on the CPU inference path (``UniRepLKNetBlock.forward_inference``):
    eval mode without autograd, fp32 on CPU, PyTorch built with oneDNN."""
    return (_ONEDNN_LINEAR is not None and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32)


_ONEDNN_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


def packed_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for inference on CPU by oneDNN's convolution with the weight reordered into its blocked
    layout once per weight version and input shape (``derived``, which keeps the last shape's; inputs of
    varying size reorder as before, once per change): ``F.conv2d`` reorders it on every call,
    7.4 MB at UniRepLKNet-T's last downsample (there 2.1 against 3.0 ms NCHW or 6.0 ms channels-last at
    batch 1, Zen 3). ``conv(x)`` itself where oneDNN is absent, inside a dispatch mode (FLOP counting)
    or while compiling."""
    if _ONEDNN_CONV is None or autotune.intercepted():
        return conv(x)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    weight = derived(conv, "packed", (conv.weight,), lambda: torch._C._nn.mkldnn_reorder_conv2d_weight(
        conv.weight.detach().to_mkldnn(), *args, list(x.shape)), key=tuple(x.shape))
    return _ONEDNN_CONV(x, weight, conv.bias, *args, "none", [], "")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with ReLU and sigmoid gates (keys ``down``, ``up``: 1x1 convs, as officially)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def gate(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The per-image channel gate [B, C] of ``x`` [B, C, H, W] (the 1x1 convs as Linear on the pooled vector),
        from ``pooled``, x's mean over H and W, where the caller has it."""
        pooled = x.mean((2, 3)) if pooled is None else pooled
        s = F.relu(F.linear(pooled, self.down.weight.flatten(1), self.down.bias))
        return torch.sigmoid(F.linear(s, self.up.weight.flatten(1), self.up.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]


SQUARES_CHUNK = 1 << 18  # elements per partial sum of _squares_over_pixels: a 1 MiB fp32 temporary


def _squares_over_pixels(x: torch.Tensor) -> torch.Tensor:
    """Sum over H, W of ``x * x`` [B, C] for a map with channels innermost (NHWC memory), over chunks of
    pixel rows: a whole-map temporary of squares is as large as the map (32 MiB at UniRepLKNet-T's stage 1,
    batch 8), freshly mapped and faulted in each call, which costs 4x the arithmetic."""
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view when channels are innermost
    total = None
    for part in rows.split(max(1, SQUARES_CHUNK // (b * c)), dim=1):
        s = (part * part).sum(1)
        total = s if total is None else total.add_(s)
    return total


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on NHWC inputs: ``(gamma * N(x) + 1) * x + beta``; ``beta`` is dropped in deploy form."""

    def __init__(self, dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if bias else None

    def channel_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``gamma * N(x) + 1`` [B, C] of ``x`` [B, C, H, W] in either memory format: GRN is ``x * scale + beta``."""
        if x.is_contiguous():  # H, W innermost: one fused pass
            gx = torch.linalg.vector_norm(x.flatten(2), dim=-1)
        else:
            # over outer dims vector_norm is 5-7x slower on CPU than squares summed; the clamp keeps
            # the gradient of an all-zero channel 0 (as vector_norm's), not NaN
            gx = _squares_over_pixels(x).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
        return self.gamma.view(1, -1) * (gx / (gx.mean(dim=1, keepdim=True) + 1e-6)) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.channel_scale(x.permute(0, 3, 1, 2))[:, None, None, :] * x
        return y if self.beta is None else y + self.beta


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, *, overwrite: bool = False) -> torch.Tensor:
    """The 1x1 conv ``weight`` [Cout, Cin] (+ ``bias``) of ``x * scale``, ``x`` [B, Cin, H, W] in either memory format.

    Nothing is converted: on an NCHW batch of several images the weight multiplies each image's
    [Cin, H*W] matrix (output NCHW); otherwise the pixels are the rows (``nn.Linear`` on NHWC; for one
    NCHW image that is the transposed view, which the GEMM reads as is, and measured faster than the
    column form there). ``scale`` [B, Cin] (a per-image channel scale: SE's gate, GRN's) multiplies the smaller
    operand: ``x`` (B*Cin*H*W products) or, on maps of more than Cout pixels, the weight (B*Cout*Cin).
    ``overwrite=True`` scales ``x`` in place when autograd does not track it (a caller's own
    intermediate): on this CPU a fresh map-sized output costs several times the multiply.
    """
    b, c, h, w = x.shape
    fold = scale is not None and h * w > weight.shape[0]
    if scale is not None and not fold:
        x = x.mul_(scale[:, :, None, None]) if overwrite and not x.requires_grad else x * scale[:, :, None, None]
    weights = weight * scale[:, None, :] if fold else weight.expand(b, -1, -1)  # [B, Cout, Cin]
    if x.is_contiguous() and b > 1:
        cols = x.view(b, c, h * w)
        y = torch.bmm(weights, cols) if bias is None else torch.baddbmm(bias[:, None], weights, cols)
        return y.view(b, -1, h, w)
    rows = x.permute(0, 2, 3, 1)
    if fold:
        rows, t = rows.reshape(b, h * w, c), weights.transpose(1, 2)
        y = torch.bmm(rows, t) if bias is None else torch.baddbmm(bias, rows, t)
        return y.view(b, h, w, -1).permute(0, 3, 1, 2)
    return F.linear(rows, weight, bias).permute(0, 3, 1, 2)


class DilatedReparamConv(nn.Module):
    """Depthwise ``kernel_size`` conv (``lk_origin``) plus, in train form, its dilated branches.

    Kernels 7-17 get the parallel dilated branches of ``DILATED_BRANCHES`` (each with a BN, and
    ``origin_bn`` on the main conv); kernels 3 and 5 are a plain depthwise conv. In deploy form
    (``deploy=True``) only ``lk_origin`` remains, with a bias. ``strategy`` pins its depthwise strategy.
    """

    def __init__(self, channels: int, kernel_size: int, *, deploy: bool = False, strategy: str | None = None) -> None:
        super().__init__()
        self.branches = () if deploy else DILATED_BRANCHES.get(kernel_size, ())
        self.lk_origin = DepthwiseConv2d(channels, kernel_size, bias=deploy, strategy=strategy)
        if self.branches:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in self.branches:
                setattr(self, f"dil_conv_k{k}_{r}", DepthwiseConv2d(channels, k, dilation=r))
                setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lk_origin(x)
        if not self.branches:
            return y
        y = self.origin_bn(y)
        for k, r in self.branches:
            y = y + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return y


def _block_to_deploy(state: dict[str, torch.Tensor], prefix: str, kernel_size: int) -> None:
    """Rewrite one block's train-form entries of ``state`` (keys ``prefix`` + model names) into deploy form.

    dwconv: every branch kernel is BN-scaled, dilated to a dense kernel and added to the centre of
    the large one; the block's ``norm`` BN scales the sum. FFN tail: ``gamma * BN(W2 (g + beta))``
    = ``(gamma * s * W2) g + gamma * (s * (W2 beta) + shift)``, with (s, shift) the BN's affine map.
    """
    w = state.pop(f"{prefix}dwconv.lk_origin.weight")
    b = w.new_zeros(w.shape[0])
    branches = DILATED_BRANCHES.get(kernel_size, ())
    if branches:
        s, b = pop_bn(state, f"{prefix}dwconv.origin_bn")
        w = w * s.view(-1, 1, 1, 1)
        for k, r in branches:
            s, t = pop_bn(state, f"{prefix}dwconv.dil_bn_k{k}_{r}")
            branch = state.pop(f"{prefix}dwconv.dil_conv_k{k}_{r}.weight") * s.view(-1, 1, 1, 1)
            w = w + center_pad(dilate_kernel(branch, r), kernel_size)
            b = b + t
    s, t = pop_bn(state, f"{prefix}norm")
    state[f"{prefix}dwconv.lk_origin.weight"] = w * s.view(-1, 1, 1, 1)
    state[f"{prefix}dwconv.lk_origin.bias"] = b * s + t

    beta = state.pop(f"{prefix}grn.beta").flatten()
    w2 = state.pop(f"{prefix}pwconv2.weight")
    s, t = pop_bn(state, f"{prefix}pwconv2_bn")
    gamma = state.pop(f"{prefix}gamma", None)
    if gamma is None:
        gamma = torch.ones_like(s)
    state[f"{prefix}pwconv2.weight"] = (gamma * s).unsqueeze(1) * w2
    state[f"{prefix}pwconv2.bias"] = gamma * (s * (w2 @ beta) + t)


class UniRepLKNetBlock(nn.Module):
    """dwconv -> BN -> SE -> Linear -> GELU -> GRN -> Linear -> BN -> layer scale, residual."""

    def __init__(self, dim: int, kernel_size: int, *, drop_path: float = 0.0,
                 layer_scale_init_value: float | None = 1e-6, ffn_ratio: float = 4.0, deploy: bool = False,
                 dw_strategy: str | None = None) -> None:
        super().__init__()
        if kernel_size not in SMALL_KERNELS and kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"kernel_size must be one of {SMALL_KERNELS + tuple(DILATED_BRANCHES)}, got {kernel_size}")
        self.dim, self.kernel_size, self.hidden = dim, kernel_size, int(ffn_ratio * dim)
        self.dw_strategy = dw_strategy
        self.se = SqueezeExcite(dim, dim // 4)
        self.pwconv1 = nn.Linear(dim, self.hidden)
        self.act = nn.GELU()
        self._build_reparam_parts(deploy=deploy, layer_scale_init_value=layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _build_reparam_parts(self, *, deploy: bool, layer_scale_init_value: float | None) -> None:
        """The submodules whose form differs between train and deploy."""
        self.deploy = deploy
        self.dwconv = DilatedReparamConv(self.dim, self.kernel_size, deploy=deploy, strategy=self.dw_strategy)
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(self.dim)
        self.grn = GlobalResponseNorm(self.hidden, bias=not deploy)
        self.pwconv2 = nn.Linear(self.hidden, self.dim, bias=deploy)
        self.pwconv2_bn = nn.Identity() if deploy else nn.BatchNorm2d(self.dim)
        use_gamma = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(torch.full((self.dim,), float(layer_scale_init_value))) if use_gamma else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_inference(self, x):
            return self.forward_inference(x)
        # the official SE -> pwconv1 -> GELU -> GRN -> pwconv2 on NHWC, computed in x's memory format, with
        # SE's gate and GRN's scale applied by pointwise_conv and GRN's bias moved into pwconv2's (W2 beta)
        y = self.norm(self.dwconv(x))
        y = pointwise_conv(y, self.pwconv1.weight, self.pwconv1.bias, self.se.gate(y), overwrite=True)
        # without autograd, GELU in place: on the large early maps a fresh output costs as much as GELU itself
        y = self.act(y) if y.requires_grad else torch.ops.aten.gelu_(y)
        y = self.pwconv2_bn(pointwise_conv(y, self.pwconv2.weight, self._pwconv2_bias(),
                                           self.grn.channel_scale(y), overwrite=True))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    def _pwconv2_bias(self) -> torch.Tensor | None:
        """``pwconv2``'s bias with GRN's bias moved in (``W2 beta``) in train form."""
        if self.grn.beta is None:
            return self.pwconv2.bias
        grn_bias = self.pwconv2.weight @ self.grn.beta.flatten()
        return grn_bias if self.pwconv2.bias is None else self.pwconv2.bias + grn_bias

    def _pwconv1_gelu_grn(self, rows: torch.Tensor) -> torch.Tensor:
        """GRN(GELU(pwconv1(rows))) on channels-last rows [b, h, w, c] (GRN's bias is in pwconv2's), by the
        fastest for this shape of ``autotune.fastest``'s timing: oneDNN's GEMM with GELU fused (fastest on
        AVX-512), or oneDNN's or MKL's (``F.linear``) GEMM with GELU computed in the compiled GRN's first
        pass (on AVX2 MKL's GEMM is 5-15% faster, and the compiled GELU 1.6x ATen's)."""
        w, bias, approximate = self.pwconv1.weight, self.pwconv1.bias, self.act.approximate
        lib = scan_cpu.kernel()
        compiled = lib is not None and approximate == "none"  # the compiled GELU is the exact one

        def grn_(hidden: torch.Tensor, gelu: bool) -> torch.Tensor:
            if lib is not None and (compiled or not gelu):
                return scan_cpu.grn_(lib, hidden, self.grn.gamma, gelu=gelu)
            if gelu:
                hidden = torch.ops.aten.gelu_(hidden, approximate=approximate)
            return hidden.mul_(self.grn.channel_scale(hidden.permute(0, 3, 1, 2))[:, None, None, :])

        runs = {"onednn fused": lambda: grn_(_ONEDNN_LINEAR(rows, w, bias, "gelu", [], approximate), False),
                "onednn": lambda: grn_(_ONEDNN_LINEAR(rows, w, bias, "none", [], ""), True),
                # MKL's GEMM copies a bias into its whole output first: the compiled GRN pass adds it instead
                "mkl": ((lambda: scan_cpu.grn_(lib, F.linear(rows, w), self.grn.gamma, bias=bias, gelu=True))
                        if compiled else lambda: grn_(F.linear(rows, w, bias), True))}
        key = ("pwconv1_gelu_grn", autotune.bucket(rows.numel() // rows.shape[-1]), tuple(w.shape), approximate,
               rows.dtype, lib is not None)
        return runs[autotune.fastest(key, runs, default="onednn fused")]()

    def _pwconv2(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """pwconv2(hidden) (+ ``residual``) on rows [n, hidden], by the fastest for this shape: oneDNN's GEMM
        with the add fused, or MKL's followed by the add."""
        w, bias = self.pwconv2.weight, self._pwconv2_bias()
        if residual is None:
            runs = {"onednn": lambda: _ONEDNN_LINEAR(hidden, w, bias, "none", [], ""),
                    "mkl": lambda: F.linear(hidden, w, bias)}
        else:
            # MKL's: the residual plus the bias in one pass into rows, the GEMM accumulating into them
            runs = {"onednn": lambda: _ONEDNN_LINEAR.binary(hidden, residual, w, bias, "add"),
                    "mkl": lambda: torch.add(residual, bias, out=hidden.new_empty(residual.shape)).addmm_(
                        hidden, w.t())}
        key = ("pwconv2", autotune.bucket(hidden.shape[0]), tuple(w.shape), residual is None, hidden.dtype)
        return runs[autotune.fastest(key, runs, default="onednn")]()

    @torch.no_grad()
    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """The eval-mode block on CPU, output channels-last: pixels are the GEMM rows of the whole batch
        (one GEMM per 1x1 conv, not one per image); GELU runs inside oneDNN's GEMM or the compiled GRN's
        first pass, in deploy form the residual add inside oneDNN's GEMM or with MKL's, the depthwise conv
        in NCHW, channels-last or by the compiled kernel (which also pools its output for SE): whichever is
        measured fastest for the shape on this CPU (``autotune``). SE's gate multiplies the conv's output
        into channels-last rows."""
        b, c, h, w = x.shape
        if self.deploy:  # the compiled depthwise conv, where it is the pick, also pools its output for SE
            y, pooled = self.dwconv.lk_origin.forward_pooled(x)
        else:
            y, pooled = self.norm(self.dwconv(x)), None
        rows = torch.empty(b, h, w, c, dtype=x.dtype, device=x.device)
        torch.mul(y.permute(0, 2, 3, 1), self.se.gate(y, pooled)[:, None, None, :], out=rows)
        # the compiled GRN (when it builds): two passes over the map instead of about ten ops
        hidden = self._pwconv1_gelu_grn(rows).view(-1, self.hidden)
        if self.deploy:
            out = self._pwconv2(hidden, x.permute(0, 2, 3, 1).reshape(-1, c))
            return out.view(b, h, w, c).permute(0, 3, 1, 2)
        y = self._pwconv2(hidden, None)
        y = self.pwconv2_bn(y.view(b, h, w, c).permute(0, 3, 1, 2))
        return (y if self.gamma is None else y.mul_(self.gamma.view(1, -1, 1, 1))).add_(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to the deploy form in place (same eval-mode function); a no-op when already there."""
        if self.deploy:
            return
        state = dict(self.state_dict())
        _block_to_deploy(state, "", self.kernel_size)
        with torch.device("meta"):
            self._build_reparam_parts(deploy=True, layer_scale_init_value=None)
        self.load_state_dict(state, assign=True)


class UniRepLKNet(Backbone):
    """UniRepLKNet backbone: conv stem (stride 4), then four stages joined by stride-2 conv downsamples.

    ``kernel_sizes[i]`` lists the depthwise kernel of each block of stage ``i``. ``embed`` is the
    official pooling: global average, then LayerNorm. ``num_classes > 0`` adds the official ``head``.

    >>> m = UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (13,), (13,), (13,)))
    >>> m.embed(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 64])
    """

    family = "large-kernel"
    embed_modules = ("norm", "head")  # used by embed() only: dropped by prune_to_features()

    def __init__(self, *, depths: Sequence[int], dims: Sequence[int], kernel_sizes: Sequence[Sequence[int]],
                 in_chans: int = 3, num_classes: int = 0, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float | None = 1e-6, ffn_ratio: float = 4.0, deploy: bool = False,
                 out_indices: Sequence[int] | None = None, img_size: int | None = None) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4 or len(kernel_sizes) != 4:
            raise ValueError(f"UniRepLKNet has 4 stages: got depths={tuple(depths)}, dims={tuple(dims)}, "
                             f"{len(kernel_sizes)} kernel lists")
        for i, (d, ks) in enumerate(zip(depths, kernel_sizes)):
            if len(ks) != d:
                raise ValueError(f"stage {i} has depth {d} but {len(ks)} kernel sizes {tuple(ks)}")
        self.num_classes = num_classes
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1), LayerNorm2d(dims[0] // 2, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1], eps=1e-6)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        # With autograd on CPU each stage runs in one memory format, set at its start (the residual stream
        # keeps it): NCHW where it has a kernel of 5-13 (see nchw_kernel), channels-last otherwise; each
        # depthwise conv converts to the layout measured fastest. Inference runs channels-last.
        self.stage_formats = tuple(
            torch.contiguous_format if any(nchw_kernel(k) for k in ks) else torch.channels_last for ks in kernel_sizes)
        self.stages = nn.ModuleList()
        for i, ks in enumerate(kernel_sizes):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dims[i], k, drop_path=rates[start + j], layer_scale_init_value=layer_scale_init_value,
                                 ffn_ratio=ffn_ratio, deploy=deploy)
                for j, k in enumerate(ks)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else None
        self.apply(self._init_weights)

        self.all_feature_info = FeatureInfo(tuple(dims), (4, 8, 16, 32), dims[-1])
        self.set_out_indices(out_indices)
        self.pretrained_cfg = pretrained_cfg_for(img_size or 224, classifier="head")

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def deploy(self) -> bool:
        """Whether every block is in deploy form."""
        return all(b.deploy for b in self.modules() if isinstance(b, UniRepLKNetBlock))

    def reparameterize(self) -> None:
        """Merge every block into its deploy form (call in eval mode; see the module docstring)."""
        for m in self.modules():
            if isinstance(m, UniRepLKNetBlock):
                m.reparameterize()

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels, cpu = [], x.device.type == "cpu"
        if cpu:  # the stem too runs channels-last: its LayerNorms then read NHWC rows without a copy
            x = x.contiguous(memory_format=torch.channels_last)
        fused = fused_inference(self, x)
        formats = (torch.channels_last,) * 4 if fused else self.stage_formats
        for down, stage, fmt in zip(self.downsample_layers, self.stages, formats):
            if fused:  # inference: the stem's and downsamples' convs with weights reordered once (packed_conv)
                for layer in down:
                    x = packed_conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
            else:
                # on a channels-last input PyTorch copies the conv's weight to channels-last on every call:
                # where the map is the smaller of the two it is cheaper to convert (the last downsample of
                # UniRepLKNet-T has 7.4 MB of weight, a batch-1 input 0.25 MB)
                x = down(x.contiguous() if cpu and x.numel() < down[0].weight.numel() else x)
            x = stage(x.contiguous(memory_format=fmt) if cpu else x)
            levels.append(x)
        return levels

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.norm(self.forward_levels(x)[-1].mean((-2, -1)))

    def get_classifier(self) -> nn.Module:
        if self.head is None:
            return super().get_classifier()
        return self.head


# official key -> model key; the official block wraps its Linear layers and GRN in nn.Sequential
_OFFICIAL_RENAMES = (
    (re.compile(r"^(stages\.\d+\.\d+\.dwconv)\.(weight|bias)$"), r"\1.lk_origin.\2"),
    (re.compile(r"\.pwconv1\.1\."), ".pwconv1."),
    (re.compile(r"\.act\.1\."), ".grn."),
    (re.compile(r"\.pwconv2\.0\."), ".pwconv2."),
    (re.compile(r"\.pwconv2\.2\."), ".pwconv2_bn."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """Map an official UniRepLKNet state dict (train or deploy form) onto ``model``'s keys.

    Drops ``head.*`` when the model has no classifier. A train-form checkpoint loaded into a
    deploy-form model (``deploy=True``) is reparameterized block by block here; a deploy-form
    checkpoint needs a deploy-form model (the merge cannot be undone).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith("head.") and model.head is None:
            continue
        for pattern, repl in _OFFICIAL_RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    for name, block in model.named_modules():
        if not isinstance(block, UniRepLKNetBlock):
            continue
        train_form = f"{name}.norm.running_var" in out
        if train_form and block.deploy:
            _block_to_deploy(out, f"{name}.", block.kernel_size)
        elif not train_form and not block.deploy and f"{name}.dwconv.lk_origin.bias" in out:
            raise ValueError(f"the checkpoint is in deploy form (block {name} has no BatchNorm); "
                             f"build the model with deploy=True to load it")
    return out


_HF = "https://huggingface.co/DingXiaoH/UniRepLKNet/resolve/main/"
_CHECKPOINTS = {  # variant -> (official ImageNet-1k checkpoint, its resolution, its tag)
    "unireplknet_a": ("unireplknet_a_in1k_224_acc77.03.pth", 224, "in1k"),
    "unireplknet_f": ("unireplknet_f_in1k_224_acc78.58.pth", 224, "in1k"),
    "unireplknet_p": ("unireplknet_p_in1k_224_acc80.23.pth", 224, "in1k"),
    "unireplknet_n": ("unireplknet_n_in1k_224_acc81.64.pth", 224, "in1k"),
    "unireplknet_t": ("unireplknet_t_in1k_224_acc83.21.pth", 224, "in1k"),
    "unireplknet_s": ("unireplknet_s_in1k_224_acc83.91.pth", 224, "in1k"),
    "unireplknet_b": ("unireplknet_b_in22k_to_in1k_384_acc87.40.pth", 384, "in22k_ft_in1k_384"),
}

# the official kernel plans: 3x3 in stage 1, 13x13 elsewhere, interleaved with 3x3 in stage 3 of T/S/B
_KERNELS_AFP = ((3, 3), (13, 13), (13,) * 6, (13, 13))
_KERNELS_N = ((3, 3), (13, 13), (13,) * 8, (13, 13))
_KERNELS_T = ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3)
_KERNELS_SB = ((3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3)


def _create_unireplknet(variant: str, **kwargs: Any) -> UniRepLKNet:
    model = UniRepLKNet(**kwargs)
    if variant in _CHECKPOINTS:
        file, size, tag = _CHECKPOINTS[variant]
        model.pretrained_cfg = pretrained_cfg_for(kwargs.get("img_size") or size, url=_HF + file, tag=tag,
                                                  classifier="head", crop_pct=0.875 if size == 224 else 1.0)
    return model


@register_backbone(family="large-kernel", tiny=True)
def unireplknet_test(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=((3,), (13,), (13, 3), (13,)))
    return _create_unireplknet("unireplknet_test", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_a(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), kernel_sizes=_KERNELS_AFP)
    return _create_unireplknet("unireplknet_a", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_f(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), kernel_sizes=_KERNELS_AFP)
    return _create_unireplknet("unireplknet_f", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_p(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), kernel_sizes=_KERNELS_AFP)
    return _create_unireplknet("unireplknet_p", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_n(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), kernel_sizes=_KERNELS_N)
    return _create_unireplknet("unireplknet_n", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_t(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640), kernel_sizes=_KERNELS_T)
    return _create_unireplknet("unireplknet_t", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_s(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_sizes=_KERNELS_SB)
    return _create_unireplknet("unireplknet_s", **{**args, **kwargs})


@register_backbone(family="large-kernel")
def unireplknet_b(**kwargs: Any) -> UniRepLKNet:
    args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), kernel_sizes=_KERNELS_SB)
    return _create_unireplknet("unireplknet_b", **{**args, **kwargs})
