"""Depthwise convolution along the tokens of a time-major sequence, as one custom op.

Mamba mixes each channel over a few neighbouring tokens (a depthwise conv of kernel 4) before
its scan. On [B, T, C] tensors, the layout the scan and the projections use, the conv is ``k``
shifted multiply-adds: on a CPU the compiled kernels of ``scan_cpu`` (one pass, input read in
place, zero padding implicit), elsewhere ``k`` ``addcmul``s, either way faster forward and
backward than ``nn.Conv1d`` on the transposed [B, C, T] view. It is a ``torch.library`` custom
op so that ``FlopCounterMode`` counts its multiply-adds like a conv's (elementwise ops are not
counted) and meta tensors get shapes without running it.

>>> depthwise_conv_tokens(torch.randn(2, 7, 5), torch.randn(5, 4), torch.randn(5), pad=3).shape  # causal
torch.Size([2, 7, 5])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import scan_cpu


def _kernel(x: Tensor, weight: Tensor):
    """The compiled kernels when they can run this conv (fp32 CPU tensors with contiguous channels), else None."""
    fits = weight.dtype == torch.float32 and x.stride(2) == 1 and weight.shape[1] <= scan_cpu.MAX_STATE
    return scan_cpu.kernel_for(x) if fits else None


@torch.library.custom_op("backbone_arena::depthwise_conv_tokens", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor, pad: int) -> Tensor:
    lib = _kernel(x, weight)
    if lib is not None:
        return scan_cpu.token_conv(lib, x, weight, bias, pad=pad)
    k = weight.shape[1]
    xp = F.pad(x, (0, 0, pad, 0))
    T = xp.shape[1] - k + 1
    u = torch.addcmul(bias, xp[:, :T], weight[:, 0])
    for j in range(1, k):
        u.addcmul_(xp[:, j:j + T], weight[:, j])
    return u


@_conv_op.register_fake
def _(x, weight, bias, pad):
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    return x.new_empty(x.shape[0], x.shape[1] + pad - weight.shape[1] + 1, x.shape[2], dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, ctx.pad = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    k, T, pad = weight.shape[1], grad.shape[1], ctx.pad
    lib = _kernel(x, weight)
    if lib is not None:
        return *scan_cpu.token_conv_backward(lib, x, weight, grad, pad=pad), None
    xp = F.pad(x, (0, 0, pad, 0))
    grad_xp = torch.zeros_like(xp)
    grad_w = torch.empty_like(weight)
    for j in range(k):
        grad_xp[:, j:j + T].addcmul_(grad, weight[:, j])
        grad_w[:, j] = (grad * xp[:, j:j + T]).sum((0, 1))
    return grad_xp[:, pad:], grad_w, grad.sum((0, 1)), None


_conv_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.backbone_arena.depthwise_conv_tokens)
def _conv_flops(x_shape, weight_shape, bias_shape, pad, *args, **kwargs) -> int:
    b, length, c = x_shape
    k = weight_shape[1]
    return 2 * b * (length + pad - k + 1) * c * k


def depthwise_conv_tokens(x: Tensor, weight: Tensor, bias: Tensor, *, pad: int = 0) -> Tensor:
    """Depthwise conv along the tokens of time-major ``x`` [B, T, C] after ``pad`` zero tokens: [B, T + pad - k + 1, C].

    ``weight`` is [C, k] (``nn.Conv1d``'s [C, 1, k] without the middle dim), ``bias`` [C]; the
    output is ``F.conv1d`` of the transposed sequence padded on the left (``pad = k - 1``: causal).
    """
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[2] or bias.shape != (x.shape[2],):
        raise ValueError(f"depthwise_conv_tokens takes x [B, T, C], weight [C, k] and bias [C], got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    k = weight.shape[1]
    if not 0 <= pad < k or x.shape[1] + pad < k:
        raise ValueError(f"pad must be in [0, k - 1] = [0, {k - 1}] and x must hold at least k - pad tokens, "
                         f"got pad={pad} and {x.shape[1]} tokens")
    return _conv_op(x, weight, bias, pad)


__all__ = ["depthwise_conv_tokens"]
