"""Fast selective scan vs the sequential reference at Vim-Ti shapes, forward + backward, side by side.

    python benchmarks/selective_scan.py [--batch 8] [--channels 384] [--d-state 16] [--length 197] [--repeats 5]

Five implementations run interleaved in the same process on the same inputs (the ratios are
what to read: absolute times move with the machine's load):

* ``upstream-style``: ``upstream_style_ref``, the arithmetic of ``mamba_ssm``'s pure-PyTorch
  ``selective_scan_ref`` (discretize every token into [b, d, l, n] tensors, then a Python loop over
  tokens reading out with ``einsum('bdn,bn->bd')``), under autograd: the baseline the speed-ups
  are stated against;
* ``reference``: this project's ``selective_scan_ref`` (the same structure; it expands B and C to
  every channel, which handles grouped B/C in one code path but is slower), under autograd;
* ``per-step loop``: the same loop with the discretization done inside each step on one token's
  [b, d, n] slice (cache-resident on a CPU), under autograd: a stronger sequential baseline;
* ``fast, PyTorch``: ``selective_scan`` with ``ARENA_SCAN_KERNEL=torch`` (blocked, chunked scan;
  backward by recomputation);
* ``fast, fused``: ``selective_scan`` as it runs by default on a CPU: forward and backward by the
  compiled kernels of ``backbones/ops/scan_cpu.py``.

The table gives median times, the speed-up over the upstream-style reference, and the largest
relative difference of each fast scan's output and gradients from the project's reference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones.ops.selective_scan import selective_scan, selective_scan_ref  # noqa: E402


def vim_inputs(batch: int, channels: int, d_state: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs shaped and scaled like a Vim-Ti layer at initialization (A = -(1..N), softplus(bias) in [1e-3, 0.1])."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(channels, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    return {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": 0.1 * torch.randn(batch, channels, length, generator=g),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
        "D": torch.ones(channels),
        "z": torch.randn(batch, channels, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def upstream_style_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """The sequential scan with the arithmetic of ``mamba_ssm``'s ``selective_scan_ref`` (B, C [b, n, l])."""
    dt = delta.float() + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    u = u.float()
    decay = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
    inp = torch.einsum("bdl,bnl,bdl->bdln", dt, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return (torch.stack(ys, dim=2) + u * D[:, None]) * F.silu(z)


def per_step_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """Sequential scan that discretizes one token at a time (no [b, d, l, n] tensors)."""
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    h = u.new_zeros(*u.shape[:2], A.shape[1])
    ys = []
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t[:, None]
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)


def with_kernel(choice: str):
    """``selective_scan`` with ``ARENA_SCAN_KERNEL`` set to ``choice`` for the call."""
    def scan(**kw):
        saved = os.environ.get("ARENA_SCAN_KERNEL")
        os.environ["ARENA_SCAN_KERNEL"] = choice
        try:
            return selective_scan(**kw)
        finally:
            os.environ.pop("ARENA_SCAN_KERNEL") if saved is None else os.environ.update(ARENA_SCAN_KERNEL=saved)
    return scan


IMPLEMENTATIONS = {"upstream-style": upstream_style_ref, "reference": selective_scan_ref,
                   "per-step loop": per_step_loop, "fast, PyTorch": with_kernel("torch"),
                   "fast, fused": with_kernel("auto")}


def run(fn, inputs: dict[str, torch.Tensor]) -> tuple[float, float, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and forward + backward seconds of one call (CPU time with one thread), its output and gradients."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    t0 = clock()
    y = fn(**leaves, delta_softplus=True)
    t1 = clock()
    (y * torch.cos(y.detach())).sum().backward()
    t2 = clock()
    return t1 - t0, t2 - t0, y.detach(), {k: v.grad for k, v in leaves.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def measure(names: list[str], inputs: dict[str, torch.Tensor], repeats: int) -> tuple[dict, dict]:
    """Median (forward, forward + backward) seconds per implementation, run round-robin, and the last results."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    results = {}
    for name in names:  # warm-up (first calls; builds the fused kernel if needed)
        run(IMPLEMENTATIONS[name], vim_inputs(1, 16, inputs["A"].shape[1], 8))
    for _ in range(repeats):
        for name in names:
            fwd, total, *results[name] = run(IMPLEMENTATIONS[name], inputs)
            times[name].append((fwd, total))
    med = {k: (statistics.median(f for f, _ in v), statistics.median(t for _, t in v)) for k, v in times.items()}
    return med, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=384, help="d_inner (Vim-Ti: 2 x 192)")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = vim_inputs(args.batch, args.channels, args.d_state, args.length)
    med, results = measure(list(IMPLEMENTATIONS), inputs, args.repeats)
    print(f"selective scan, batch {args.batch}, d_inner {args.channels}, d_state {args.d_state}, "
          f"{args.length} tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'implementation':<16}{'forward ms':>12}{'fwd+bwd ms':>12}{'speed-up fwd':>14}{'speed-up fwd+bwd':>18}")
    base = med["upstream-style"]
    for name in IMPLEMENTATIONS:
        f, t = med[name]
        print(f"{name:<16}{1e3 * f:>12.1f}{1e3 * t:>12.1f}{base[0] / f:>13.1f}x{base[1] / t:>17.1f}x")
    y_ref, g_ref = results["reference"]
    for name in ("upstream-style", "fast, PyTorch", "fast, fused"):
        y, g = results[name]
        diffs = {"output": rel(y, y_ref), **{f"grad {k}": rel(g[k], g_ref[k]) for k in g_ref}}
        print(f"{name}: max relative difference " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
