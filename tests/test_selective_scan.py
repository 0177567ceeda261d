"""The fast selective scan against the sequential reference: outputs, gradients, dtypes, FLOPs."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones.ops.selective_scan import SCAN_BLOCK, SCAN_CHUNK, selective_scan, selective_scan_macs, selective_scan_ref


def _inputs(b: int, d: int, l: int, n: int, *, groups: int = 0, gate: bool = True, dtype=torch.float32,
            dt_bias: float = -3.0, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    bc = (b, groups, n, l) if groups else (b, n, l)
    t = {
        "u": torch.randn(b, d, l, generator=g),
        "delta": 0.5 * torch.randn(b, d, l, generator=g),
        "A": -torch.exp(torch.randn(d, n, generator=g)),
        "B": torch.randn(*bc, generator=g),
        "C": torch.randn(*bc, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(b, d, l, generator=g) if gate else None,
        "delta_bias": dt_bias + torch.rand(d, generator=g),
    }
    return {k: (v.to(dtype) if v is not None and k in ("u", "delta", "B", "C", "z") else v) for k, v in t.items()}


def _run(fn, inputs: dict, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y = fn(**{**inputs, **leaves}, delta_softplus=True, **kw)
    weight = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * weight).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("b,d,l,n,groups,gate", [
    (1, 3, 1, 1, 0, False),                     # a single token
    (2, 5, 7, 3, 0, True),                      # shorter than one chunk
    (2, 4, SCAN_CHUNK, 4, 0, True),             # exactly one chunk
    (1, 6, SCAN_CHUNK + 1, 2, 0, False),        # one step into the second chunk
    (1, 6, 197, 16, 0, True),                   # Vim's sequence at 224 (odd, 12 chunks + 5)
    (1, 8, SCAN_CHUNK ** 2 + 3, 2, 0, True),    # chunk summaries scanned in chunks themselves
    (1, 4, SCAN_BLOCK + 45, 3, 0, True),        # state carried across blocks
    (2, 12, 49, 1, 4, False),                   # VMamba: four route groups, d_state 1
])
def test_matches_reference(b, d, l, n, groups, gate):
    inputs = _inputs(b, d, l, n, groups=groups, gate=gate, seed=l)
    y_ref, g_ref = _run(selective_scan_ref, inputs)
    y, g = _run(selective_scan, inputs)
    assert y.shape == (b, d, l) and y.dtype == torch.float32
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_strong_decay_stays_finite_and_exact():
    """Per-step log-decays of -80 (exp(-80 * 16 steps) underflows): no overflow, still the reference."""
    inputs = _inputs(2, 4, 3 * SCAN_CHUNK + 5, 4, dt_bias=5.0)
    inputs["A"] = torch.full((4, 4), -16.0)
    y_ref, g_ref = _run(selective_scan_ref, inputs)
    y, g = _run(selective_scan, inputs)
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_bf16_inputs_match_reference_in_fp32():
    inputs = _inputs(2, 8, 45, 4, dtype=torch.bfloat16)
    y_ref, g_ref = _run(selective_scan_ref, inputs)
    y, g = _run(selective_scan, inputs)
    assert y.dtype == torch.bfloat16 and g["u"].dtype == torch.bfloat16 and g["A"].dtype == torch.float32
    assert _rel(y, y_ref) < 1e-2  # both compute in fp32; only the bf16 rounding of the output differs
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-2, k


def test_autocast_runs_in_fp32():
    inputs = _inputs(2, 8, 40, 4)
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(**inputs, delta_softplus=True)
    assert y.dtype == torch.float32 and _rel(y, y_ref) < 1e-5


def test_flop_formula_and_meta():
    inputs = _inputs(2, 8, 30, 4)
    with FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, delta_softplus=True)
    assert counter.get_total_flops() == 2 * selective_scan_macs(2, 8, 30, 4, with_D=True, with_z=True)
    assert selective_scan_macs(1, 384, 197, 16, with_D=True) == (9 * 16 + 1) * 384 * 197
    meta = {k: (v.to("meta") if v is not None else None) for k, v in inputs.items()}
    assert selective_scan(**meta, delta_softplus=True).shape == (2, 8, 30)


@pytest.mark.parametrize("bad,match", [
    ({"u": torch.zeros(2, 8)}, "u of shape"),
    ({"delta": torch.zeros(2, 8, 31)}, "delta and z"),
    ({"A": torch.zeros(7, 4)}, "A must be"),
    ({"B": torch.zeros(2, 3, 4, 30)}, "B must be"),
    ({"D": torch.zeros(3)}, "D must be"),
])
def test_bad_shapes_name_the_contract(bad, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**{**_inputs(2, 8, 30, 4), **bad})
