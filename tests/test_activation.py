"""``backbones.ops.activation.GELU``: nn.GELU's function and gradient by the compiled kernel, any layout."""
from __future__ import annotations

import math

import pytest
import torch

from backbones.ops import scan_cpu
from backbones.ops.activation import GELU


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_gelu_matches_pytorchs_value_and_gradient(fmt: torch.memory_format) -> None:
    if scan_cpu.kernel() is None:
        pytest.skip("no C compiler for the compiled kernels")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 13, 5, 7, generator=g) * 4).contiguous(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(2, 13, 5, 7, generator=g)
    y = GELU()(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    exact = 0.5 * x64 * torch.special.erfc(-x64 / math.sqrt(2))
    (dx64,) = torch.autograd.grad(exact, x64, grad.double())
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    scale = x64.detach().abs().clamp(min=1)
    assert ((y.double() - exact) / scale).abs().max() < 3e-7
    assert ((dx.double() - dx64) / (scale * grad.double().abs().clamp(min=1))).abs().max() < 1e-6
    with torch.no_grad():  # without autograd: the kernel alone, the same numbers
        assert torch.equal(GELU()(x), y.detach())
    tails = torch.tensor([-1e18, -40.0, -7.0, 7.0, 40.0, 1e18], requires_grad=True)
    (d_tails,) = torch.autograd.grad(GELU()(tails).sum(), tails)
    assert d_tails.tolist() == [0.0, 0.0, pytest.approx(0.0, abs=1e-9), 1.0, 1.0, 1.0]


def test_tanh_form_and_other_dtypes_take_pytorchs_path() -> None:
    x = torch.randn(4, 6)
    torch.testing.assert_close(GELU(approximate="tanh")(x), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(GELU()(x.double()), torch.nn.functional.gelu(x.double()))
    assert GELU()(x[:, ::2]).shape == (4, 3)  # strided: PyTorch's path
