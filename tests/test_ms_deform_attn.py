"""Multi-scale deformable attention: the grid_sample implementation against a point-by-point reference."""
from __future__ import annotations

import math

import pytest
import torch

from backbones.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn

SHAPES = [(5, 6), (3, 3)]


def _bilinear(plane: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One bilinear tap on ``plane`` [dim, H, W] at pixel coords (x, y), zero outside (CUDA kernel rule)."""
    _, h, w = plane.shape
    x0, y0 = math.floor(x.item()), math.floor(y.item())
    out = plane.new_zeros(plane.shape[0])
    for yi, wy in ((y0, (y0 + 1) - y), (y0 + 1, y - y0)):
        for xi, wx in ((x0, (x0 + 1) - x), (x0 + 1, x - x0)):
            if 0 <= yi < h and 0 <= xi < w:
                out = out + wy * wx * plane[:, yi, xi]
    return out


def _reference(value, shapes, locations, weights):
    """Direct definition: for every query, head, level and point, sample and accumulate."""
    b, _, heads, dim = value.shape
    _, q, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    rows = []
    for bi in range(b):
        queries = []
        for qi in range(q):
            per_head = []
            for hd in range(heads):
                acc = value.new_zeros(dim)
                for lv, (h, w) in enumerate(shapes):
                    plane = value[bi, starts[lv]:starts[lv + 1], hd].t().reshape(dim, h, w)
                    for p in range(points):
                        x = locations[bi, qi, hd, lv, p, 0] * w - 0.5
                        y = locations[bi, qi, hd, lv, p, 1] * h - 0.5
                        acc = acc + weights[bi, qi, hd, lv, p] * _bilinear(plane, x, y)
                per_head.append(acc)
            queries.append(torch.cat(per_head))
        rows.append(torch.stack(queries))
    return torch.stack(rows)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, q, heads, dim, points = 2, 3, 2, 4, 3
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, heads, dim, generator=g, dtype=torch.float64)
    # some locations fall outside [0, 1] to exercise the zero padding
    locations = torch.rand(b, q, heads, len(SHAPES), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, q, heads, len(SHAPES), points, generator=g, dtype=torch.float64)
    return value, locations, weights


def test_values_match_pointwise_reference():
    value, locations, weights = _inputs()
    ours = ms_deform_attn(value, SHAPES, locations, weights)
    ref = _reference(value, SHAPES, locations, weights)
    assert ours.shape == (2, 3, 2 * 4)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_gradients_match_pointwise_reference():
    inputs = [t.requires_grad_() for t in _inputs(1)]
    grads = []
    for fn in (ms_deform_attn, _reference):
        out = fn(inputs[0], SHAPES, inputs[1], inputs[2])
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
                                          .view_as(out)).sum(), inputs))
    for ours, ref, name in zip(*grads, ("value", "locations", "weights")):
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


def test_sampling_at_pixel_centre_returns_that_pixel():
    value, _, _ = _inputs()
    h, w = SHAPES[0]
    loc = torch.zeros(2, 1, 2, 2, 1, 2, dtype=torch.float64)
    loc[..., 0], loc[..., 1] = (2 + 0.5) / w, (1 + 0.5) / h  # centre of pixel (row 1, col 2) on level 0
    weights = torch.zeros(2, 1, 2, 2, 1, dtype=torch.float64)
    weights[:, :, :, 0] = 1.0
    out = ms_deform_attn(value, SHAPES, loc, weights).view(2, 2, 4)
    torch.testing.assert_close(out, value[:, 1 * w + 2])


def test_module_official_keys_shapes_and_meta():
    attn = MSDeformAttn(d_model=48, n_levels=3, n_heads=6, n_points=4, ratio=0.5)
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (6 * 3 * 4 * 2, 48), "sampling_offsets.bias": (6 * 3 * 4 * 2,),
        "attention_weights.weight": (6 * 3 * 4, 48), "attention_weights.bias": (6 * 3 * 4,),
        "value_proj.weight": (24, 48), "value_proj.bias": (24,),
        "output_proj.weight": (48, 24), "output_proj.bias": (48,),
    }
    lv = [(4, 4), (2, 2), (1, 1)]
    x = torch.randn(2, 21, 48)
    ref = torch.rand(1, 21, 1, 2)
    assert attn(x, ref, x, lv).shape == (2, 21, 48)
    with torch.device("meta"):
        m = MSDeformAttn(d_model=48, n_levels=3, n_heads=6, n_points=4, ratio=0.5)
        assert m(torch.zeros(2, 21, 48), torch.zeros(1, 21, 1, 2), torch.zeros(2, 21, 48), lv).shape == (2, 21, 48)


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match="divisible by n_heads = 5"):
        MSDeformAttn(d_model=48, n_heads=5)
    value, locations, weights = _inputs()
    with pytest.raises(ValueError, match=r"spatial_shapes \[\(5, 6\)\]"):
        ms_deform_attn(value, [(5, 6)], locations, weights)
