"""Depthwise 'same' convolution with large kernels, dispatched to the fastest strategy.

On CPU, which of PyTorch's NCHW and channels-last depthwise convolutions is fast depends on the
kernel, the map, the channels and the CPU's vector ISA, by up to 12x either way: on an AVX-512
CPU (AMD EPYC Zen 4) NCHW is 1.3-2.6x faster at 13x13 and ~20x slower above it; on an AVX2 one
(Zen 3) NCHW is 9-12x slower at 11x11 and 13x13 and 15x slower at 3x3 on a 56x56 map with 80
channels, faster at 5x5-9x9 on 14x14. So the strategy is measured, not assumed: the first call of
each shape times both layouts (``tuned_strategy`` by ``autotune.fastest``) and later calls reuse
the pick. FFT convolution is never the fastest at backbone resolutions
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

import torch
import torch.nn.functional as F
from torch import nn

from . import autotune

STRATEGIES = ("plain", "channels_last", "fft")
# Kernels above this size are channels-last on CPU without timing: NCHW is ~20x slower there on every
# CPU measured, and timing it would cost one such call per shape.
CPU_NCHW_MAX_KERNEL = 13


def tuned_strategy(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1) -> str:
    """'plain' (NCHW) or 'channels_last', whichever runs this CPU conv faster from ``x``'s own layout
    (conversion included), timed by ``autotune.fastest`` on the first call of each shape (batch and pixel
    count rounded up to powers of two). Kernels above ``CPU_NCHW_MAX_KERNEL`` are channels-last untimed;
    'plain' is the default where nothing is timed."""
    if weight.shape[-1] > CPU_NCHW_MAX_KERNEL:
        return "channels_last"
    xd, wd = x.detach(), weight.detach()
    b, c, h, w = x.shape
    key = ("depthwise", autotune.bucket(b), c, autotune.bucket(h * w), x.is_contiguous(), tuple(weight.shape),
           dilation, x.dtype)
    return autotune.fastest(key, {s: (lambda s=s: _layout_conv(xd, wd, None, dilation, s))
                                  for s in ("plain", "channels_last")}, default="plain")


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


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     dilation: int = 1, strategy: str | None = None) -> torch.Tensor:
    """Stride-1 depthwise conv of ``x`` [B, C, H, W] with ``weight`` [C, 1, k, k], same-size output.

    ``strategy`` is one of ``STRATEGIES`` ('plain': NCHW memory); ``None`` picks ``tuned_strategy`` on
    CPU and runs ``x`` as given elsewhere. The output may be channels-last in memory (its shape is
    always NCHW).
    """
    if strategy is None:
        if x.device.type != "cpu":
            return _same_conv(x, weight, bias, dilation)
        strategy = tuned_strategy(x, weight, dilation)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    if strategy == "fft":
        if dilation != 1:
            raise ValueError(f"the fft strategy takes dilation=1 only, got dilation={dilation}")
        return _fft_depthwise(x, weight, bias)
    return _layout_conv(x, weight, bias, dilation, strategy)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, dilation=self.dilation[0], strategy=self.strategy)


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


__all__ = ["STRATEGIES", "CPU_NCHW_MAX_KERNEL", "tuned_strategy",
           "depthwise_conv2d", "DepthwiseConv2d", "pop_bn", "pop_conv_bn", "dilate_kernel", "center_pad"]
