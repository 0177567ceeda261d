"""Depthwise 'same' convolution with large kernels, dispatched to the fastest strategy.

On CPU, PyTorch's NCHW depthwise convolution leaves its fast path for kernels above 13x13
(a 15x15 kernel is ~20x slower than a 13x13 one there), while the channels-last path stays fast at
every size: channels-last is 14-40x faster above 13x13 and 1.5-2.6x slower at 13x13; up to 7x7
it is 1.1-1.7x faster on maps of 14x14 and smaller and mostly slower on larger ones. FFT
convolution is never the fastest at backbone resolutions (<= 56x56).
``benchmarks/large_kernel_conv.py`` measures the strategies side by side; ``default_strategy``
encodes its result. Other devices use plain ``F.conv2d`` (cuDNN picks its own algorithm).

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

STRATEGIES = ("plain", "channels_last", "fft")
# The largest kernel for which NCHW depthwise convolution stays on PyTorch's fast CPU path.
CPU_NCHW_MAX_KERNEL = 13
# Small kernels (up to this size) on small maps (up to this many pixels) are faster channels-last.
CPU_SMALL_KERNEL, CPU_SMALL_MAP = 7, 14 * 14


def default_strategy(kernel_size: int, device_type: str, pixels: int | None = None) -> str:
    """The fastest measured strategy for a ``kernel_size`` depthwise conv on a map of ``pixels`` (H * W)."""
    if device_type != "cpu":
        return "plain"
    if kernel_size > CPU_NCHW_MAX_KERNEL:
        return "channels_last"
    if kernel_size <= CPU_SMALL_KERNEL and pixels is not None and pixels <= CPU_SMALL_MAP:
        return "channels_last"
    return "plain"


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

    ``strategy`` is one of ``STRATEGIES``; ``None`` picks ``default_strategy``. The output may
    be channels-last in memory (its shape is always NCHW).
    """
    k = weight.shape[-1]
    if strategy is None:
        strategy = default_strategy(k, x.device.type, x.shape[-2] * x.shape[-1])
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    if strategy == "fft":
        if dilation != 1:
            raise ValueError(f"the fft strategy takes dilation=1 only, got dilation={dilation}")
        return _fft_depthwise(x, weight, bias)
    if strategy == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation, groups=x.shape[1])


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


__all__ = ["STRATEGIES", "CPU_NCHW_MAX_KERNEL", "CPU_SMALL_KERNEL", "CPU_SMALL_MAP", "default_strategy",
           "depthwise_conv2d", "DepthwiseConv2d", "pop_bn", "pop_conv_bn", "dilate_kernel", "center_pad"]
