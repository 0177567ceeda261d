"""UniRepLKNet-T vs ConvNeXt-T: CPU inference at 224, side by side.

    python benchmarks/unireplknet_vs_convnext.py [--batch 4] [--size 224] [--repeats 5] [--threads 1]

UniRepLKNet-T runs in both forms (train form in eval mode, and reparameterized); ConvNeXt-T is
``backbones.create_backbone("convnext_tiny")`` (timm). All run interleaved in one process on the
same batch; the table gives params, GMACs, best-of-N images/s and the throughput ratio to
ConvNeXt-T. Read the ratios: absolute times move with the machine's load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arena.bench import count_flops, count_params  # noqa: E402
from backbones import create_backbone  # noqa: E402
from large_kernel_conv import time_interleaved  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
