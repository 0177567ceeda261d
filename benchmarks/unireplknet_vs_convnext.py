"""UniRepLKNet-T vs ConvNeXt-T: CPU inference at 224, side by side.

    python benchmarks/unireplknet_vs_convnext.py [--batch 4] [--size 224] [--repeats 5] [--threads 1]

UniRepLKNet-T runs in both forms (train form in eval mode, and reparameterized); ConvNeXt-T is
``backbones.create_backbone("convnext_tiny")`` (timm). All run interleaved in one process on the
same batch; the table gives params, GMACs, best-of-N images/s and the throughput ratio to
ConvNeXt-T. Read the ratios: absolute times move with the machine's load.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arena.bench import count_flops, count_params  # noqa: E402
from backbones import create_backbone  # noqa: E402
from timing import time_interleaved, timing_args  # noqa: E402


def main() -> None:
    args = timing_args(__doc__, size=dict(type=int, default=224))
    torch.manual_seed(0)
    models = {"convnext_tiny": create_backbone("convnext_tiny").eval(),
              "unireplknet_t (train form)": create_backbone("unireplknet_t").eval(),
              "unireplknet_t (deploy form)": create_backbone("unireplknet_t", deploy=True).eval()}
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = time_interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, args.repeats)
    print(f"inference, batch {args.batch} at {args.size}x{args.size}, {torch.get_num_threads()} threads, CPU, "
          f"best of {args.repeats}; backbone only (no classifier)")
    print(f"{'model':<30}{'params M':>10}{'GMACs':>8}{'img/s':>9}{'vs ConvNeXt-T':>15}")
    base = t["convnext_tiny"]
    for name, m in models.items():
        gmacs = count_flops(m, args.size) / 2e9
        print(f"{name:<30}{count_params(m) / 1e6:>10.2f}{gmacs:>8.2f}{args.batch / t[name]:>9.2f}"
              f"{base / t[name]:>14.2f}x")


if __name__ == "__main__":
    main()
