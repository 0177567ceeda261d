"""``backbones.ops.conv.Conv2d``: nn.Conv2d's output and every gradient, with the weight gradient from
oneDNN or from one GEMM over the input's patches, whichever ``autotune`` picks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones.ops import autotune
from backbones.ops.conv import Conv2d


@pytest.mark.parametrize("pick", ["onednn", "gemm"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel, stride, padding, bias", [
    (3, 2, 1, True),           # VMamba's stem and downsampling
    (3, 1, 1, False),
    ((3, 5), (1, 2), (2, 0), True),  # non-square kernel, stride and padding
    (1, 1, 0, True),
])
def test_conv2d_matches_nn_conv2d(monkeypatch: pytest.MonkeyPatch, pick: str, fmt: torch.memory_format, kernel,
                                  stride, padding, bias: bool) -> None:
    monkeypatch.setattr(autotune, "fastest", lambda key, runs, default: pick)
    monkeypatch.setattr("backbones.ops.conv.PATCH_BYTES", 4096)  # several images per GEMM chunk, and one
    torch.manual_seed(0)
    ours = Conv2d(5, 7, kernel, stride, padding, bias=bias)
    ref = nn.Conv2d(5, 7, kernel, stride, padding, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 11, 12).contiguous(memory_format=fmt)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    grad = torch.randn_like(y1)
    got = torch.autograd.grad(y1, [x1, *ours.parameters()], grad)
    want = torch.autograd.grad(y2, [x2, *ref.parameters()], grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_weight_gradient_alone_when_the_input_needs_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "fastest", lambda key, runs, default: "gemm")
    conv = Conv2d(3, 4, 3, 2, 1)
    x = torch.randn(2, 3, 9, 9)  # an image batch: no gradient wanted
    conv(x).sum().backward()
    ref = nn.Conv2d(3, 4, 3, 2, 1)
    ref.load_state_dict(conv.state_dict())
    ref(x).sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_other_convs_take_pytorchs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "fastest", lambda key, runs, default: pytest.fail("no weight gradient of ours"))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    for conv in (Conv2d(4, 4, 3, groups=2), Conv2d(4, 4, 3, dilation=2), Conv2d(4, 4, 3, padding="same"),
                 Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        conv(x).sum().backward()
        assert conv.weight.grad is not None
    Conv2d(4, 4, 3).double()(x.double().detach()).sum().backward()
    with torch.no_grad():
        assert Conv2d(4, 4, 3)(x).shape == (2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: nn.Conv2d's path, in bf16
        y = Conv2d(4, 4, 3)(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
