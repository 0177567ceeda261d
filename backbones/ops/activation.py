"""GELU by the compiled CPU kernel (``scan_cpu.gelu``) where it applies, PyTorch's elsewhere.

On fp32 CPU tensors, in its exact (erf) form, GELU is one C pass forward and one backward, each
about 1.6-2x faster than ATen's (``selective_scan_cpu.c``: Phi by a rational function, the
density by ``exp``); the tanh form, other dtypes and devices, and builds without a C compiler
take ``nn.GELU``'s path.
"""
from __future__ import annotations

import torch
from torch import nn

from . import scan_cpu


class _GeluCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lib, x: torch.Tensor) -> torch.Tensor:
        ctx.lib = lib
        ctx.save_for_backward(x)
        return scan_cpu.gelu(lib, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return None, scan_cpu.gelu(ctx.lib, x, grad)


class GELU(nn.GELU):
    """``nn.GELU`` (same arguments and output), by the compiled kernel on fp32 CPU tensors in the exact form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact = self.approximate == "none" and scan_cpu.dense(x)
        lib = scan_cpu.kernel_for(x) if exact else None
        if lib is None:
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _GeluCPU.apply(lib, x)
        return scan_cpu.gelu(lib, x)
