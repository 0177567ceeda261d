"""``nn.Conv2d`` whose weight gradient on CPU may come from one GEMM over the input's patches.

oneDNN computes a dense conv's weight gradient on AVX2 CPUs at half its forward's rate or less. As
the patches-times-gradient product (im2col) the same sum is one GEMM at MKL's rate: the padded input
is viewed as its patches [N, Ho, Wo, kh, kw, C] and copied a few images at a time, so the copy stays
in cache (1.55-2.15x oneDNN at VMamba-T's strided convs, batch 8, Zen 3:
``python benchmarks/vmamba_training_parts.py --batch 8``). ``autotune.fastest`` picks between the two
per shape, timed on the first backward; the input gradient stays oneDNN's, the bias gradient is the
output gradient's sum.
"""
from __future__ import annotations

import torch
from torch import nn

from . import autotune

PATCH_BYTES = 8 << 20  # the patches copied per GEMM: a few MB, so the copy is still in cache when read


def _weight_grad_gemm(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int]) -> torch.Tensor:
    """The weight gradient [O, C, kh, kw] of a dense, undilated conv: grad^T [O, N*Ho*Wo] @ patches [N*Ho*Wo, kh*kw*C]."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = grad.shape[2:]
    padded = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)  # channels-last, zero border
    padded[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    s_n, s_h, s_w, s_c = padded.stride()
    patches = padded.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h, s_w, s_c))
    tokens = grad.permute(0, 2, 3, 1)  # a view when grad is channels-last
    out = x.new_zeros(grad.shape[1], kh * kw * c)
    step = max(1, PATCH_BYTES // (ho * wo * kh * kw * c * x.element_size()))
    for i in range(0, n, step):
        out.addmm_(tokens[i:i + step].reshape(-1, grad.shape[1]).t(), patches[i:i + step].reshape(-1, kh * kw * c))
    return out.view(-1, kh, kw, c).permute(0, 3, 1, 2)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, ctx.stride, ctx.padding = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        def onednn(mask: list[bool]) -> tuple:
            return torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(ctx.stride), list(ctx.padding),
                [1, 1], False, [0, 0], 1, mask)

        grad_x = onednn([True, False, False])[0] if need_x else None
        grad_b = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None  # oneDNN's would also run its weight pass
        grad_w = None
        if need_w:
            runs = {"onednn": lambda: onednn([False, True, False])[1],
                    "gemm": lambda: _weight_grad_gemm(x, grad, weight.shape[2:], ctx.stride, ctx.padding)}
            n, _, h, w = x.shape
            key = ("conv2d weight grad", *map(autotune.bucket, (n, h, w)), tuple(weight.shape), ctx.stride,
                   ctx.padding, x.dtype, x.is_contiguous(memory_format=torch.channels_last))
            grad_w = runs[autotune.fastest(key, runs, default="onednn")]()
        return grad_x, grad_w, grad_b, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and output); in fp32 training on CPU, a dense undilated conv's
    weight gradient is the faster of oneDNN's and one GEMM over the input's patches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or not torch.is_grad_enabled() or not self.weight.requires_grad
                or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        return _Conv2d.apply(x, self.weight, self.bias, self.stride, self.padding)
