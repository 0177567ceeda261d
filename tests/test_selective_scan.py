"""The fast selective scan against the sequential reference: outputs, gradients, dtypes, FLOPs.

Every test runs twice: with the fused CPU kernel (``ARENA_SCAN_KERNEL=auto``, the default, when a C
compiler is there) and with the pure-PyTorch scan (``torch``).
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from backbones.ops import scan_cpu
from backbones.ops.selective_scan import SCAN_BLOCK, SCAN_CHUNK, selective_scan, selective_scan_macs, selective_scan_ref


@pytest.fixture(autouse=True, params=["auto", "torch"])
def scan_kernel(request, monkeypatch) -> str:
    monkeypatch.setenv("ARENA_SCAN_KERNEL", request.param)
    return request.param


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


def _run(fn, inputs: dict, *, delta_softplus: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y = fn(**{**inputs, **leaves}, delta_softplus=delta_softplus)
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
    (2, 40, 70, 4, 2, True),                    # groups of 20 channels: two kernel blocks share B and C
])
def test_matches_reference(b, d, l, n, groups, gate):
    inputs = _inputs(b, d, l, n, groups=groups, gate=gate, seed=l)
    y_ref, g_ref = _run(selective_scan_ref, inputs)
    y, g = _run(selective_scan, inputs)
    assert y.shape == (b, d, l) and y.dtype == torch.float32
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


@pytest.mark.parametrize("b,d,l,n,groups,threads", [
    (1, 282, 37, 1, 2, 1),    # groups of 141 channels: two full wide blocks and one of 13 (a vector and 5 lanes)
    (2, 128, 50, 2, 0, 2),    # d_state 2, two full wide blocks, split over two threads
    (1, 64, 1400, 1, 4, 2),   # a long sequence: wide forward, narrow backward; more threads than blocks
])
def test_wide_blocks_match_reference(b, d, l, n, groups, threads, scan_kernel, set_threads):
    """With one or two states the kernels walk 8 vectors of channels per block (VMamba's shapes): full and
    partial blocks, forward and backward, against the sequential reference."""
    inputs = _inputs(b, d, l, n, groups=groups, seed=d)
    y_ref, g_ref = _run(selective_scan_ref, inputs)
    set_threads(threads)
    y, g = _run(selective_scan, inputs)
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


@pytest.mark.parametrize("absent", [("D", "delta_bias", "z"), ("z",), ("D",)])
def test_optional_inputs_and_no_softplus(absent):
    inputs = _inputs(2, 20, 41, 3, seed=3)
    inputs["delta_bias"] = inputs["delta_bias"].abs()  # steps used as given, without softplus: keep them positive
    inputs = {k: None if k in absent else v.abs() if k == "delta" else v for k, v in inputs.items()}
    y_ref, g_ref = _run(selective_scan_ref, inputs, delta_softplus=False)
    y, g = _run(selective_scan, inputs, delta_softplus=False)
    assert _rel(y, y_ref) < 1e-5
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_large_state_beyond_the_kernel_registers():
    """d_state above the fused kernel's limit takes the PyTorch scan, forward and backward."""
    inputs = _inputs(1, 4, 20, scan_cpu.MAX_STATE + 1)
    y_ref, g_ref = _run(selective_scan_ref, inputs)
    y, g = _run(selective_scan, inputs)
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_backward_takes_the_forward_path(monkeypatch, scan_kernel):
    """The fused backward runs exactly when the forward was fused, whatever the setting at backward time."""
    calls = []
    real = scan_cpu.scan_backward
    monkeypatch.setattr(scan_cpu, "scan_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    inputs = _inputs(1, 4, 9, 2)
    u = inputs["u"].clone().requires_grad_(True)
    y = selective_scan(**{**inputs, "u": u}, delta_softplus=True)
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "torch" if scan_kernel == "auto" else "auto")
    y.sum().backward()
    fused = scan_kernel == "auto" and shutil.which("cc") is not None
    assert len(calls) == int(fused) and u.grad.shape == u.shape


@pytest.mark.parametrize("groups", [0, 2])
def test_traced_by_torch_compile_forward_and_backward(scan_kernel, groups: int) -> None:
    """Both directions of the op are opaque to tracing (the fused backward an op of its own, with a fake that
    gives the real result's layouts), so AOT autograd traces a training step and computes the same gradients."""
    inputs = _inputs(2, 4, 9, 2, groups=groups)
    inputs["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)  # time-major, as the models pass it
    compiled = torch.compile(selective_scan, backend="aot_eager", dynamic=False)
    y, g = _run(compiled, inputs)
    y_ref, g_ref = _run(selective_scan, inputs)
    fused = scan_kernel == "auto" and shutil.which("cc") is not None  # the same kernel calls: the same numbers
    tolerance = dict(rtol=0, atol=0) if fused else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tolerance)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **tolerance)
    if fused:  # the fakes give the real results' shapes, dtypes and strides (opcheck raises on any difference)
        args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [True]
        torch.library.opcheck(torch.ops.backbone_arena.selective_scan.default, args)
        torch.library.opcheck(torch.ops.backbone_arena.selective_scan_backward.default, [torch.randn_like(y), *args])


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
    ({"u": torch.zeros(2, 8, 0)}, "at least one token"),
    ({"delta": torch.zeros(2, 8, 31)}, "delta and z"),
    ({"A": torch.zeros(7, 4)}, "A must be"),
    ({"B": torch.zeros(2, 3, 4, 30)}, "B must be"),
    ({"D": torch.zeros(3)}, "D must be"),
])
def test_bad_shapes_name_the_contract(bad, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**{**_inputs(2, 8, 30, 4), **bad})


def _time_major(inputs: dict) -> dict:
    """The kernel's layout: u, delta, z [b, l, d]; B, C [b, l, g, n]."""
    B, C = (t if t.ndim == 4 else t[:, None] for t in (inputs["B"], inputs["C"]))
    return {"u": inputs["u"].transpose(1, 2), "delta": inputs["delta"].transpose(1, 2), "A": inputs["A"],
            "B": B.permute(0, 3, 1, 2), "C": C.permute(0, 3, 1, 2), "D": inputs["D"],
            "z": None if inputs["z"] is None else inputs["z"].transpose(1, 2), "delta_bias": inputs["delta_bias"]}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fused kernel")
def test_fused_kernel_state_carry_reverse_and_strided_views(scan_kernel):
    """Two halves with the state carried, a backward scan, and inputs that are views into wider tensors."""
    if scan_kernel == "torch":
        assert scan_cpu.kernel() is None
        return
    lib = scan_cpu.kernel()
    assert lib is not None
    b, d, l, n = 2, 37, 53, 5  # 37 channels: two full blocks of 16 and a partial one
    inputs = _inputs(b, d, l, n)
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    tm = _time_major(inputs)
    h = torch.zeros(b, n, d)
    halves = [scan_cpu.scan(lib, **{k: (v[:, part] if k in ("u", "delta", "B", "C", "z") else v) for k, v in tm.items()},
                            h=h, delta_softplus=True) for part in (slice(0, 30), slice(30, l))]
    assert _rel(torch.cat(halves, 1).transpose(1, 2), y_ref) < 1e-5
    flipped = selective_scan_ref(**{k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v)
                                    for k, v in inputs.items()}, delta_softplus=True).flip(-1)
    y_rev = scan_cpu.scan(lib, **tm, h=torch.zeros(b, n, d), delta_softplus=True, reverse=True)
    assert _rel(y_rev.transpose(1, 2), flipped) < 1e-5
    wide = torch.randn(b, l, 3 * n)  # B and C as column slices of one projection, as Vim's x_proj gives them
    wide[..., :n], wide[..., 2 * n:] = tm["B"][:, :, 0], tm["C"][:, :, 0]
    strided = {**tm, "B": wide[:, :, None, :n], "C": wide[:, :, None, 2 * n:]}
    out = torch.zeros(b, l, 2 * d)[..., d:]  # written in place through its strides
    scan_cpu.scan(lib, **strided, h=torch.zeros(b, n, d), delta_softplus=True, out=out)
    assert _rel(out.transpose(1, 2), y_ref) < 1e-5


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fused kernel")
def test_fused_conv_silu_and_gated_sum_of_two_directions(scan_kernel):
    """Vim's streamed inference pieces: conv + SiLU with zeros past both ends, and a reverse scan that
    adds the forward one's output and gates the sum in the same pass."""
    if scan_kernel == "torch":
        pytest.skip("the fused kernel is off")
    lib = scan_cpu.kernel()
    g = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(2, 11, 2 * 37, generator=g)[..., 37:], torch.randn(37, 4, generator=g), torch.randn(37)
    for pad, length in ((3, 11), (0, 11), (1, 13)):
        want = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (pad, length + 3 - pad - 11)), w[:, None], bias, groups=37))
        got = scan_cpu.token_conv(lib, x, w, bias, pad=pad, length=length, silu=True)
        assert got.shape == (2, length, 37)
        assert _rel(got.transpose(1, 2), want) < 1e-6, (pad, length)
        wide = torch.randn(2, length, 3 * 37, generator=g)  # into half of wider rows, then added to them
        before = wide.clone()
        scan_cpu.token_conv(lib, x, w, bias, pad=pad, length=length, out=wide[..., 37:74])
        scan_cpu.token_conv(lib, x, w, bias, pad=pad, length=length, out=wide[..., 37:74], accumulate=True)
        conv = F.conv1d(F.pad(x.transpose(1, 2), (pad, length + 3 - pad - 11)), w[:, None], bias, groups=37)
        assert _rel(wide[..., 37:74].transpose(1, 2), 2 * conv) < 1e-6, (pad, length)
        assert torch.equal(wide[..., :37], before[..., :37]) and torch.equal(wide[..., 74:], before[..., 74:])
    with pytest.raises(ValueError, match="pass the tensor to add to as out"):
        scan_cpu.token_conv(lib, x, w, bias, accumulate=True)
    with pytest.raises(ValueError, match="contiguous channels"):
        scan_cpu.token_conv(lib, x, w, bias, pad=3, length=11, out=torch.zeros(2, 37, 11).transpose(1, 2))
    b, d, l, n = 2, 37, 29, 5
    inputs = _inputs(b, d, l, n)
    tm = _time_major(inputs)
    ungated = {**tm, "z": None}
    fwd = scan_cpu.scan(lib, **ungated, h=torch.zeros(b, n, d), delta_softplus=True)
    bwd = scan_cpu.scan(lib, **ungated, h=torch.zeros(b, n, d), delta_softplus=True, reverse=True)
    out = fwd.clone()
    scan_cpu.scan(lib, **tm, h=torch.zeros(b, n, d), delta_softplus=True, reverse=True, out=out, accumulate=True)
    assert _rel(out, (fwd + bwd) * F.silu(tm["z"])) < 1e-6
    with pytest.raises(ValueError, match="pass the tensor to add to as out"):
        scan_cpu.scan(lib, **tm, h=torch.zeros(b, n, d), accumulate=True)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fused kernel")
@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("silu", [False, True])
def test_fused_conv_backward_matches_autograd(scan_kernel, set_threads, silu: bool, threads: int):
    """Vim's conv (+ SiLU) gradients in one pass against autograd through F.conv1d: every padding, outputs shorter
    than, as long as and longer than the input, sequences shorter than the kernel, 37 channels (a partial
    vector, split over threads, more threads than blocks of channels), x's gradient added into a strided view
    of wider rows."""
    if scan_kernel == "torch":
        pytest.skip("the fused kernel is off")
    lib = scan_cpu.kernel()
    set_threads(threads)
    g = torch.Generator().manual_seed(5)
    c = 37
    for t in (11, 2):
        for pad in range(4):
            for length in sorted(n for n in {t + pad - 3, t, t + 2} if n > 0):
                x = torch.randn(2, t, 2 * c, generator=g)[..., c:]
                w, bias = torch.randn(c, 4, generator=g), torch.randn(c, generator=g)
                leaves = [v.clone().requires_grad_() for v in (x, w, bias)]
                a = F.conv1d(F.pad(leaves[0].transpose(1, 2), (pad, length + 3 - pad - t)), leaves[1][:, None],
                             leaves[2], groups=c).transpose(1, 2)
                grad = torch.randn(a.shape, generator=g)
                (F.silu(a) if silu else a).backward(grad)
                rows = torch.randn(2, t, 3 * c, generator=g)
                before = rows.clone()
                dx, dw, db = scan_cpu.token_conv_backward(lib, x, w, grad, pad=pad, silu_bias=bias if silu else None,
                                                          out=rows[..., c:2 * c], accumulate=True)
                case = (t, pad, length)
                assert _rel(dx - before[..., c:2 * c], leaves[0].grad) < 1e-6, case
                assert _rel(dw, leaves[1].grad) < 1e-6 and _rel(db, leaves[2].grad) < 1e-6, case
                assert torch.equal(rows[..., :c], before[..., :c]) and torch.equal(rows[..., 2 * c:], before[..., 2 * c:])
    fresh = scan_cpu.token_conv_backward(lib, x, w, grad, pad=pad, silu_bias=bias if silu else None)[0]
    assert _rel(fresh, dx - before[..., c:2 * c]) < 1e-6  # written into a new tensor without out
    with pytest.raises(ValueError, match="grad must be"):
        scan_cpu.token_conv_backward(lib, x, w, grad[..., 1:])


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fused kernel")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,k,n", [(7, 384, 44), (8, 5, 1), (3, 19, 64), (1, 40, 17), (6, 12, 33)])
def test_thin_matmul_and_its_second_stage(scan_kernel, set_threads, rows: int, k: int, n: int, threads: int):
    """Vim's x and dt projections: an output of whole and partial vectors, odd row counts, strided input rows."""
    if scan_kernel == "torch":
        pytest.skip("the fused kernel is off")
    lib = scan_cpu.kernel()
    width = scan_cpu.block_width(lib)
    if n > scan_cpu.THIN_VECTORS * width:
        pytest.skip("wider than the kernel's registers on this CPU")
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(2, rows, k + 3, generator=g)[..., 2:k + 2]  # rows with a stride of their own
    w, w2 = torch.randn(n, k, generator=g), torch.randn(2 * width + 3, min(n, 12), generator=g)  # dt_proj-like
    wt = scan_cpu.thin_weight(lib, w)
    assert wt.shape == (k, -(-n // width) * width) and torch.equal(wt[:, n:], torch.zeros_like(wt[:, n:]))
    set_threads(threads)
    y = scan_cpu.thin_matmul(lib, x, wt, n)
    y2, z = scan_cpu.thin_matmul(lib, x, wt, n, then=w2.t().contiguous())
    want = x @ w.t()
    assert y.shape == (2, rows, n) and _rel(y, want) < 1e-6
    assert torch.equal(y2, y) and z.shape == (2, rows, w2.shape[0])
    assert _rel(z, want[..., :w2.shape[1]] @ w2.t()) < 1e-6
    with pytest.raises(ValueError, match="then must be"):
        scan_cpu.thin_matmul(lib, x, wt, n, then=torch.zeros(n + 1, 4))
    with pytest.raises(ValueError, match="wt must be"):
        scan_cpu.thin_matmul(lib, x, wt[1:].contiguous(), n)
    with pytest.raises(ValueError, match="outputs up to"):
        scan_cpu.thin_weight(lib, torch.zeros(scan_cpu.THIN_VECTORS * width + 1, k))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fused kernel")
def test_fused_backward_of_a_reversed_scan_on_strided_views(scan_kernel):
    """scan_backward(reverse=True) reads views in place and equals the reference's gradients on flipped inputs."""
    if scan_kernel == "torch":
        pytest.skip("the fused kernel is off")
    lib = scan_cpu.kernel()
    b, d, l, n = 2, 37, 41, 4
    inputs = _inputs(b, d, l, n, seed=5)
    seq_keys = ("u", "delta", "B", "C", "z")
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y = selective_scan_ref(**{k: (v.flip(-1) if k in seq_keys else v) for k, v in leaves.items()},
                           delta_softplus=True).flip(-1)
    grad = torch.randn_like(y)
    y.backward(grad)
    tm = _time_major(inputs)
    wide = torch.randn(b, l, 3 * n)  # B and C as column slices of one projection
    wide[..., :n], wide[..., 2 * n:] = tm["B"][:, :, 0], tm["C"][:, :, 0]
    tm = {**tm, "B": wide[:, :, None, :n], "C": wide[:, :, None, 2 * n:]}
    got = scan_cpu.scan_backward(lib, grad.transpose(1, 2), **tm, delta_softplus=True, reverse=True)
    for k in ("u", "delta", "z"):
        assert _rel(got[k].transpose(1, 2), leaves[k].grad) < 1e-4, k
    for k in ("B", "C"):
        assert _rel(got[k][:, :, 0].transpose(1, 2), leaves[k].grad) < 1e-4, k
    for k in ("A", "D", "delta_bias"):
        assert _rel(got[k], leaves[k].grad) < 1e-4, k


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the fused kernel")
def test_fused_grid_scan_reads_routes_through_a_map_in_place(scan_kernel):
    """scan_grid over a [b, rows, cols, d] map and its transpose, forwards and backwards, equals scan on
    the route copied out as a sequence, bit for bit; the routes' outputs add up in place."""
    if scan_kernel == "torch":
        pytest.skip("the fused kernel is off")
    lib = scan_cpu.kernel()
    g = torch.Generator().manual_seed(5)
    b, h, w, d, n = 2, 5, 7, 37, 3
    x, dt = torch.randn(b, h, w, d, generator=g), 0.5 * torch.randn(b, h, w, 2 * d, generator=g)[..., d:]
    proj = torch.randn(b, h, w, 2 * n + 1, generator=g)  # B and C as slices of a wider projection
    A, D, bias = -torch.rand(d, n, generator=g), torch.randn(d, generator=g), torch.rand(d, generator=g) - 3
    out, total = torch.zeros(b, w, h, d), 0
    for column in (False, True):
        for reverse in (False, True):
            route = (lambda t: t.transpose(1, 2)) if column else (lambda t: t)
            views = {"u": route(x), "delta": route(dt), "B": route(proj[..., None, 1:n + 1]),
                     "C": route(proj[..., None, n + 1:])}
            kw = {"D": D, "delta_bias": bias, "delta_softplus": True, "reverse": reverse}
            got = scan_cpu.scan_grid(lib, **views, A=A, h=torch.zeros(b, n, d), **kw)
            seq = {k: v.flatten(1, 2) for k, v in views.items()}  # the route as a copied sequence
            want = scan_cpu.scan(lib, **seq, A=A, h=torch.zeros(b, n, d), **kw).view(got.shape)
            assert torch.equal(got, want), (column, reverse)
            scan_cpu.scan_grid(lib, **views, A=A, h=torch.zeros(b, n, d), out=out.transpose(1, 2) if not column
                               else out, accumulate=True, **kw)
            total = total + (got if column else got.transpose(1, 2))
    assert _rel(out, total) < 1e-6


def test_fused_kernel_math_at_the_extremes():
    """The kernel's own exp and softplus through the scan: steps from softplus(-100) to 80, decays to exp(-2400)."""
    lib = scan_cpu.kernel()
    if lib is None:
        pytest.skip("pure-PyTorch run, or no C compiler")
    delta = torch.tensor([-100.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 0.5, 5.0, 19.0, 25.0, 80.0]).view(1, -1, 1)
    u, B, C = torch.ones(1, 11, 1), torch.ones(1, 11, 1, 1), torch.ones(1, 11, 1, 1)
    for a in (-30.0, -1.0, -1e-4):
        A = torch.full((1, 1), a)
        y = scan_cpu.scan(lib, u, delta, A, B, C, torch.zeros(1, 1, 1), delta_softplus=True).transpose(1, 2)
        ref = selective_scan_ref(u.transpose(1, 2), delta.transpose(1, 2), A, B[:, :, :, 0].permute(0, 2, 1),
                                 C[:, :, :, 0].permute(0, 2, 1), delta_softplus=True)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-37), a
    delta[0, 6, 0] = float("nan")  # a NaN step reaches its token's output and every later one's, as in the reference
    y = scan_cpu.scan(lib, u, delta, torch.full((1, 1), -1.0), B, C, torch.zeros(1, 1, 1), delta_softplus=True)
    assert y[0, :6].isfinite().all() and y[0, 6:].isnan().all()


def test_kernel_choice_and_fallback(monkeypatch, tmp_path, scan_kernel):
    """A bad choice names the options; without a compiler the scan warns once and stays PyTorch."""
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "cuda")
    with pytest.raises(ValueError, match="'auto'.*'torch'"):
        scan_cpu.kernel()
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    scan_cpu._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert scan_cpu.kernel() is None
        inputs = _inputs(1, 4, 9, 2)
        assert _rel(selective_scan(**inputs, delta_softplus=True), selective_scan_ref(**inputs, delta_softplus=True)) < 1e-5
        if shutil.which("cc") and scan_kernel == "auto":  # a fresh build lands in the cache directory (once)
            monkeypatch.setenv("CC", "cc")
            scan_cpu._load.cache_clear()
            assert scan_cpu.kernel() is not None
            assert len(list((tmp_path / "backbone-arena").glob("selective_scan_cpu-*.so"))) == 1
    finally:
        scan_cpu._load.cache_clear()
