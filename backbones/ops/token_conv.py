"""Depthwise convolution along the tokens of a time-major sequence, as one custom op.

Mamba mixes each channel over a few neighbouring tokens (a depthwise conv of kernel 4) before
its scan. On [B, T, C] tensors, the layout the scan and the projections use, the conv is ``k``
shifted multiply-adds, which on a CPU is faster forward and backward than ``nn.Conv1d`` on the
transposed [B, C, T] view (whole Vim-Ti training steps: 16-25% faster). It is a
``torch.library`` custom op so that ``FlopCounterMode`` counts its multiply-adds like a conv's
(elementwise ops are not counted) and meta tensors get shapes without running it.

>>> depthwise_conv_tokens(torch.randn(2, 7 + 3, 5), torch.randn(5, 4), torch.randn(5)).shape  # 3 tokens of padding
torch.Size([2, 7, 5])
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


@torch.library.custom_op("backbone_arena::depthwise_conv_tokens", mutates_args=())
def _conv_op(xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    k = weight.shape[1]
    T = xp.shape[1] - k + 1
    u = torch.addcmul(bias, xp[:, :T], weight[:, 0])
    for j in range(1, k):
        u.addcmul_(xp[:, j:j + T], weight[:, j])
    return u


@_conv_op.register_fake
def _(xp, weight, bias):
    dtype = torch.promote_types(torch.promote_types(xp.dtype, weight.dtype), bias.dtype)
    return xp.new_empty(xp.shape[0], xp.shape[1] - weight.shape[1] + 1, xp.shape[2], dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    xp, weight, _ = inputs
    ctx.save_for_backward(xp, weight)


def _backward(ctx, grad: Tensor):
    xp, weight = ctx.saved_tensors
    k, T = weight.shape[1], grad.shape[1]
    grad_xp = torch.zeros_like(xp)
    grad_w = torch.empty_like(weight)
    for j in range(k):
        grad_xp[:, j:j + T].addcmul_(grad, weight[:, j])
        grad_w[:, j] = (grad * xp[:, j:j + T]).sum((0, 1))
    return grad_xp, grad_w, grad.sum((0, 1))


_conv_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.backbone_arena.depthwise_conv_tokens)
def _conv_flops(xp_shape, weight_shape, bias_shape, *args, **kwargs) -> int:
    b, length, c = xp_shape
    k = weight_shape[1]
    return 2 * b * (length - k + 1) * c * k


def depthwise_conv_tokens(xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise conv along the tokens of time-major ``xp`` [B, T + k - 1, C] (padding included): [B, T, C].

    ``weight`` is [C, k] (``nn.Conv1d``'s [C, 1, k] without the middle dim), ``bias`` [C]; the
    output is ``F.conv1d`` of the transposed sequence, without padding.
    """
    if xp.ndim != 3 or weight.ndim != 2 or weight.shape[0] != xp.shape[2] or bias.shape != (xp.shape[2],):
        raise ValueError(f"depthwise_conv_tokens takes xp [B, T, C], weight [C, k] and bias [C], got "
                         f"{tuple(xp.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    if xp.shape[1] < weight.shape[1]:
        raise ValueError(f"xp must hold at least k={weight.shape[1]} tokens (padding included), got {xp.shape[1]}")
    return _conv_op(xp, weight, bias)


__all__ = ["depthwise_conv_tokens"]
