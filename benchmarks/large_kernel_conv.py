"""Large-kernel depthwise convolution strategies side by side, at the stage shapes of a 224 input.

    python benchmarks/large_kernel_conv.py [--batch 4] [--kernels 7 13 17 31] [--repeats 5] [--threads 1]

For each (kernel, stage) case every strategy of ``backbones.ops.large_kernel`` (plain NCHW
``F.conv2d``, channels-last, FFT via ``torch.fft``, and the compiled channels-last kernel where it
builds) runs interleaved in one process on the same input, without autograd; the table gives
best-of-N milliseconds (process CPU time with one thread, see ``time_interleaved``), the speed-up
over plain, the fastest strategy and the one the models use in inference (``tuned_strategy``: the
fastest as timed on this CPU at the first call of a shape; ``ARENA_AUTOTUNE=0``: NCHW up to 13x13). Channels are RepLKNet-31B's (128/256/512/1024
at 56/28/14/7). Read the ratios: absolute times move with the machine's load.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones.ops import scan_cpu  # noqa: E402
from backbones.ops.large_kernel import STRATEGIES, depthwise_conv2d, tuned_strategy  # noqa: E402
from timing import time_interleaved, timing_args  # noqa: E402

STAGES = ((128, 56), (256, 28), (512, 14), (1024, 7))  # (channels, resolution) at a 224 input


def main() -> None:
    args = timing_args(__doc__, kernels=dict(type=int, nargs="+", default=[7, 13, 17, 31]))
    print(f"depthwise conv, batch {args.batch}, {torch.get_num_threads()} threads, CPU, "
          f"best of {args.repeats} (ms); speed-up = plain / strategy")
    strategies = [s for s in STRATEGIES if s != "compiled" or scan_cpu.kernel() is not None]
    head = "".join(f"{s:>15}" for s in strategies) + "".join(f"{'x ' + s:>16}" for s in strategies[1:])
    print(f"{'kernel':>6}{'C':>6}{'HxW':>7}{head}{'fastest':>15}{'picked':>15}")
    agree = 0
    cases = [(k, c, hw) for k in args.kernels for c, hw in STAGES]
    for k, c, hw in cases:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(args.batch, c, hw, hw, generator=g), torch.randn(c, 1, k, k, generator=g)
        with torch.no_grad():
            ms = {s: 1e3 * t for s, t in time_interleaved(
                {s: (lambda s=s: depthwise_conv2d(x, w, strategy=s)) for s in strategies}, args.repeats).items()}
            picked = tuned_strategy(x, w)
        fastest = min(ms, key=ms.get)
        # the pick is right when it is the fastest or within 10% of it (timing noise)
        agree += ms[picked] <= 1.1 * ms[fastest]
        ratios = "".join(f"{ms['plain'] / ms[s]:>16.2f}" for s in strategies[1:])
        print(f"{k:>6}{c:>6}{f'{hw}x{hw}':>7}" + "".join(f"{ms[s]:>15.2f}" for s in strategies)
              + f"{ratios}{fastest:>15}{picked:>15}")
    print(f"picked strategy fastest (or within 10%) in {agree}/{len(cases)} cases")


if __name__ == "__main__":
    main()
