"""Fast selective scan vs the sequential reference at Vim-Ti shapes, forward + backward, side by side.

    python benchmarks/selective_scan.py [--batch 8] [--channels 384] [--d-state 16] [--length 197] [--repeats 5]

Both implementations run interleaved in the same process on the same inputs (the ratio is what
to read: absolute times move with the machine's load); the table gives median times, the
speed-up, and the largest relative difference of the output and of every gradient.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

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


def run(fn, inputs: dict[str, torch.Tensor]) -> tuple[float, float, torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    t0 = time.perf_counter()
    y = fn(**leaves, delta_softplus=True)
    t1 = time.perf_counter()
    (y * torch.cos(y.detach())).sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, y.detach(), {k: v.grad for k, v in leaves.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


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
    times: dict[str, list[tuple[float, float]]] = {"reference": [], "fast": []}
    run(selective_scan, inputs)  # warm-up (first call of the custom op)
    for _ in range(args.repeats):
        for name, fn in (("reference", selective_scan_ref), ("fast", selective_scan)):
            fwd, total, y, grads = run(fn, inputs)
            times[name].append((fwd, total))
            if name == "reference":
                y_ref, g_ref = y, grads
            else:
                y_fast, g_fast = y, grads
    med = {k: (statistics.median(f for f, _ in v), statistics.median(t for _, t in v)) for k, v in times.items()}
    print(f"selective scan, batch {args.batch}, d_inner {args.channels}, d_state {args.d_state}, "
          f"{args.length} tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'implementation':<16}{'forward ms':>12}{'fwd+bwd ms':>12}{'speed-up fwd':>14}{'speed-up fwd+bwd':>18}")
    for name in ("reference", "fast"):
        f, t = med[name]
        print(f"{name:<16}{1e3 * f:>12.1f}{1e3 * t:>12.1f}{med['reference'][0] / f:>13.1f}x"
              f"{med['reference'][1] / t:>17.1f}x")
    diffs = {"output": rel(y_fast, y_ref), **{f"grad {k}": rel(g_fast[k], g_ref[k]) for k in g_ref}}
    print("max relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
