"""How well repeated `arena bench` measurements of the same cell agree.

    python benchmarks/bench_repeatability.py convnext_atto mambaout_femto --img-size 64 --repeats 5 [--clock cpu | --device cuda]

Each repeat builds the model afresh and measures it as `arena bench` does (median of timed
blocks); the script prints every repeat's throughput and the spread across repeats,
(max - min) / median, which is what "repeated runs agree within x%" means in the docs.
Each repeat also times a fixed 512x512 matmul the same way (the last row, in GFLOP/s): a
workload that never changes, so its spread is the machine's own noise floor.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from arena.bench import BenchSettings, bench_backbone, clock_threads, resolve_backbones, time_step

CONTROL_SIZE = 512


def control_gflops(settings: BenchSettings) -> float:
    """GFLOP/s of a fixed matmul timed like a bench cell (one thread under the CPU clock)."""
    device = torch.device(settings.device)
    a, b = (torch.randn(CONTROL_SIZE, CONTROL_SIZE, device=device) for _ in range(2))
    with clock_threads(settings):
        step_s, _ = time_step(lambda: a @ b, device, settings)
    return 2 * CONTROL_SIZE ** 3 / step_s / 1e9


def report(name: str, key: str, values: list[float]) -> None:
    med = statistics.median(values)
    spread = 100 * (max(values) - min(values)) / med
    print(f"{name:<18} {key:<22} {med:9.1f} {spread:6.1f}%  " + " ".join(f"{v:.1f}" for v in values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbones", nargs="+")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--block-time", type=float, default=0.5)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--device", default="cpu", help="e.g. cuda (timed with the wall clock, synchronised)")
    args = p.parse_args()
    settings = BenchSettings(batch_size=args.batch_size, blocks=args.blocks, block_time=args.block_time,
                             train=not args.no_train, clock=args.clock, device=args.device)
    keys = ["infer_samples_per_sec"] + ([] if args.no_train else ["train_samples_per_sec"])
    print(f"{'model':<18} {'column':<22} {'median':>9} {'spread':>7}  repeats")
    names = resolve_backbones(args.backbones)
    rows: dict[str, list[dict]] = {name: [] for name in names}
    control = []
    for _ in range(args.repeats):  # round-robin, so that the machine's slow phases hit every row alike
        for name in names:
            rows[name].append(bench_backbone(name, args.img_size, settings))
        control.append(control_gflops(settings))
    for name in names:
        for key in keys:
            report(name, key, [r[key] for r in rows[name]])
    report(f"matmul {CONTROL_SIZE}", "GFLOP/s (control)", control)


if __name__ == "__main__":
    main()
