"""Depthwise 'same' convolution with large kernels, dispatched to the fastest strategy.

On CPU, which of PyTorch's NCHW and channels-last depthwise convolutions is fast depends on the
kernel, the map, the channels and the CPU's vector ISA, by up to 12x either way: on an AVX-512
CPU (AMD EPYC Zen 4) NCHW is 1.3-2.6x faster at 13x13 and ~20x slower above it; on an AVX2 one
(Zen 3) NCHW is 9-12x slower at 11x11 and 13x13 and 15x slower at 3x3 on a 56x56 map with 80
channels, faster at 5x5-9x9 on 14x14. So the strategy is measured, not assumed: the first call of
each shape times both layouts (``tuned_strategy`` by ``autotune.fastest``) and later calls reuse
the pick. For inference (no autograd, fp32) a third candidate is the compiled channels-last kernel
of ``scan_cpu`` (``depthwise_conv``: register tiles that load each input once for 8 outputs, and no
taps over the zero padding), 1.4-2.3x oneDNN's channels-last conv at 13x13 on an AVX2 CPU. FFT
convolution is never the fastest at backbone resolutions
(<= 56x56). ``benchmarks/large_kernel_conv.py`` measures the strategies side by side. Other
devices use ``F.conv2d`` as given (cuDNN picks its own algorithm).

The second half of the module is the algebra of structural reparameterization (BatchNorm
folding, dilated and small kernels merged into a large one), shared by the large-kernel families.

>>> x, w = torch.randn(1, 4, 14, 14), torch.randn(4, 1, 31, 31)
>>> y = depthwise_conv2d(x, w)
>>> torch.allclose(y, depthwise_conv2d(x, w, strategy="fft"), atol=1e-3)
True
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import autotune, scan_cpu
from .derived import derived

STRATEGIES = ("plain", "channels_last", "fft", "compiled")
# Kernels above this size are not timed in NCHW on CPU: NCHW is ~20x slower there on every CPU
# measured, and timing it would cost one such call per shape.
CPU_NCHW_MAX_KERNEL = 13


def _compiled_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     dilation: int) -> ctypes.CDLL | None:
    """The compiled library when the 'compiled' strategy can run this conv: an fp32 CPU map, no dilation, no
    gradient to compute (it has no backward), nothing tracing the ops (``autotune.intercepted``); else None."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if grad or dilation != 1 or weight.dtype != torch.float32 or autotune.intercepted():
        return None
    return scan_cpu.kernel_for(x)


def conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise weight [C, 1, k, k] as the compiled kernel reads it: [k * k, C]."""
    return weight.detach().reshape(weight.shape[0], -1).t().contiguous()


def tuned_strategy(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1, bias: torch.Tensor | None = None) -> str:
    """'plain' (NCHW), 'channels_last' or, where it can run (``_compiled_kernel``: inference), 'compiled',
    whichever runs this CPU conv fastest from ``x``'s own layout (conversion included), timed by
    ``autotune.fastest`` on the first call of each shape (batch and pixel count rounded up to powers of
    two). Kernels above ``CPU_NCHW_MAX_KERNEL`` are not timed in NCHW; 'plain' is the default where
    nothing is timed ('channels_last' above that size)."""
    return _tuned(x, weight, dilation, _compiled_kernel(x, weight, bias, dilation), lambda: conv_taps(weight))


def _tuned(x: torch.Tensor, weight: torch.Tensor, dilation: int, lib: ctypes.CDLL | None,
           taps: Callable[[], torch.Tensor]) -> str:
    """``tuned_strategy`` with the compiled library ``lib`` a candidate where not None, ``taps()`` its weight
    (called only when the candidates are timed: once per shape)."""
    xd, wd = x.detach(), weight.detach()
    runs = {s: (lambda s=s: _layout_conv(xd, wd, None, dilation, s)) for s in ("plain", "channels_last")}
    if weight.shape[-1] > CPU_NCHW_MAX_KERNEL:
        del runs["plain"]
    if lib is not None:
        runs["compiled"] = lambda s="compiled": scan_cpu.depthwise_conv(
            lib, xd.contiguous(memory_format=torch.channels_last), taps())
    if len(runs) == 1:
        return next(iter(runs))
    b, c, h, w = x.shape
    key = ("depthwise", autotune.bucket(b), c, autotune.bucket(h * w), x.is_contiguous(), tuple(weight.shape),
           dilation, x.dtype, tuple(runs))
    return autotune.fastest(key, runs, default="plain" if "plain" in runs else "channels_last")


def _same_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """The 'same' depthwise conv of ``x`` in its own memory layout."""
    return F.conv2d(x, weight, bias, padding=dilation * (weight.shape[-1] - 1) // 2, dilation=dilation,
                    groups=x.shape[1])


def _layout_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int,
                 strategy: str) -> torch.Tensor:
    """The 'same' depthwise conv in NCHW ('plain') or channels-last memory."""
    fmt = torch.channels_last if strategy == "channels_last" else torch.contiguous_format
    return _same_conv(x.contiguous(memory_format=fmt), weight, bias, dilation)


def _fft_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise cross-correlation via ``torch.fft``: pointwise products of zero-padded spectra."""
    h, w = x.shape[-2:]
    k = weight.shape[-1]
    size = (h + k - 1, w + k - 1)  # linear (not circular) convolution
    spec = torch.fft.rfft2(x.float(), s=size) * torch.fft.rfft2(weight[:, 0].flip(-2, -1).float(), s=size)
    p = k // 2
    y = torch.fft.irfft2(spec, s=size)[..., p:p + h, p:p + w].to(x.dtype)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, strategy: str | None,
               taps: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conv by ``strategy`` (see ``depthwise_conv2d``) and, from the compiled kernel, each image's
    per-channel sums of it [B, C] (else None); ``taps()`` gives the weight in the compiled kernel's layout."""
    if strategy is None and x.device.type != "cpu":
        return _same_conv(x, weight, bias, dilation), None
    lib = _compiled_kernel(x, weight, bias, dilation) if strategy in (None, "compiled") else None
    if strategy is None:
        strategy = _tuned(x, weight, dilation, lib, taps)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    if strategy == "fft":
        if dilation != 1:
            raise ValueError(f"the fft strategy takes dilation=1 only, got dilation={dilation}")
        return _fft_depthwise(x, weight, bias), None
    if strategy == "compiled":
        if lib is not None:
            return scan_cpu.depthwise_conv(lib, x.contiguous(memory_format=torch.channels_last), taps(), bias)
        if not autotune.intercepted():
            raise ValueError("the compiled strategy computes fp32 CPU convs without dilation and without autograd "
                             "(inference: under torch.no_grad()), with the compiled kernel built (a C compiler, "
                             "ARENA_SCAN_KERNEL not 'torch'); pick another strategy or None")
        strategy = "channels_last"  # its function, where the ops are traced
    return _layout_conv(x, weight, bias, dilation, strategy), None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     dilation: int = 1, strategy: str | None = None) -> torch.Tensor:
    """Stride-1 depthwise conv of ``x`` [B, C, H, W] with ``weight`` [C, 1, k, k], same-size output.

    ``strategy`` is one of ``STRATEGIES`` ('plain': NCHW memory; 'compiled': inference only); ``None``
    picks ``tuned_strategy`` on CPU and runs ``x`` as given elsewhere. The output may be channels-last
    in memory (its shape is always NCHW).
    """
    return _depthwise(x, weight, bias, dilation, strategy, lambda: conv_taps(weight))[0]


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) for stride-1 depthwise 'same' convs.

    The forward goes through ``depthwise_conv2d``, so every large kernel of a model takes the
    fastest strategy for its size; ``strategy`` pins one.
    """

    def __init__(self, channels: int, kernel_size: int, *, dilation: int = 1, bias: bool = False,
                 strategy: str | None = None) -> None:
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd number for a 'same' conv, got {kernel_size}")
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
        super().__init__(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=channels, bias=bias)
        self.strategy = strategy

    def _taps(self) -> torch.Tensor:
        """The weight in the compiled kernel's layout, transposed once per weight version (``derived``)."""
        return derived(self, "taps", (self.weight,), lambda: conv_taps(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depthwise(x, self.weight, self.bias, self.dilation[0], self.strategy, self._taps)[0]

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and its mean over H and W [B, C] (a squeeze-excite's pooling), taken from the
        compiled kernel's own pass where that is the strategy."""
        y, sums = _depthwise(x, self.weight, self.bias, self.dilation[0], self.strategy, self._taps)
        return y, y.mean((2, 3)) if sums is None else sums / (y.shape[-2] * y.shape[-1])


# --- structural reparameterization: the algebra that merges branches into one kernel ----------------
def pop_bn(state: dict[str, torch.Tensor], prefix: str, *, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove BatchNorm ``prefix`` from ``state``; return (scale, shift) of its eval-mode map."""
    state.pop(f"{prefix}.num_batches_tracked", None)
    mean, var = state.pop(f"{prefix}.running_mean"), state.pop(f"{prefix}.running_var")
    gamma, beta = state.pop(f"{prefix}.weight"), state.pop(f"{prefix}.bias")
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale


def pop_conv_bn(state: dict[str, torch.Tensor], prefix: str, *, conv: str = "conv", bn: str = "bn",
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove a bias-free conv ``prefix.conv`` and its BatchNorm ``prefix.bn``; return the fused (weight, bias)."""
    scale, shift = pop_bn(state, f"{prefix}.{bn}", eps=eps)
    weight = state.pop(f"{prefix}.{conv}.weight")
    return weight * scale.view(-1, 1, 1, 1), shift


def dilate_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """The dense kernel equal to ``kernel`` applied with ``dilation`` (zeros between taps)."""
    if dilation == 1:
        return kernel
    k = kernel.shape[-1]
    size = dilation * (k - 1) + 1
    out = kernel.new_zeros(*kernel.shape[:-2], size, size)
    out[..., ::dilation, ::dilation] = kernel
    return out


def center_pad(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad an odd ``kernel`` to ``size`` x ``size`` around its centre (same 'same'-conv output)."""
    pad = (size - kernel.shape[-1]) // 2
    if pad < 0:
        raise ValueError(f"cannot merge a {kernel.shape[-1]}x{kernel.shape[-1]} kernel into a {size}x{size} one")
    return F.pad(kernel, [pad] * 4)


__all__ = ["STRATEGIES", "CPU_NCHW_MAX_KERNEL", "conv_taps", "tuned_strategy",
           "depthwise_conv2d", "DepthwiseConv2d", "pop_bn", "pop_conv_bn", "dilate_kernel", "center_pad"]
