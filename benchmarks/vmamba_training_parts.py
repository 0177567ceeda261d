"""Two parts of VMamba-T's training step, each against the PyTorch call it replaced, side by side.

    python benchmarks/vmamba_training_parts.py [--batch 4] [--repeats 5] [--threads 1]

1. The four routes' dt projections at every stage (dt [B, L, 4, R] through [4, D, R]):
   ``torch.einsum("blkr,kdr->blkd")`` and its autograd backward against ``vmamba._RouteDt``,
   the forward and the backward (both gradients) timed apart.
2. The weight gradient of the stem's second conv and of the three downsampling convs (3x3,
   stride 2, channels-last): oneDNN's (``aten.convolution_backward``) against one GEMM over the
   input's patches (``backbones.ops.conv``).

Best of ``--repeats`` in milliseconds, interleaved (``timing.time_interleaved``: process CPU time
with one thread), freed memory kept as ``train.py`` runs (``--glibc-allocator``: glibc's defaults,
where every 77 MB stage-1 output is mapped and faulted in anew). Read the ratios: absolute times
move with the machine's load.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arena.allocator import keep_freed_memory  # noqa: E402
from backbones.ops.conv import _weight_grad_gemm  # noqa: E402
from backbones.vmamba import _RouteDt  # noqa: E402
from timing import time_interleaved, timing_args  # noqa: E402

# VMamba-T at 224 px: (tokens, d_inner, dt rank) per stage; (in, out, input size) of the strided convs
STAGES = ((3136, 192, 6), (784, 384, 12), (196, 768, 24), (49, 1536, 48))
CONVS = ((48, 96, 112), (96, 192, 56), (192, 384, 28), (384, 768, 14))


def route_dt(batch: int, repeats: int) -> None:
    print(f"{'route dt, batch ' + str(batch):<30}{'einsum ms':>11}{'_RouteDt ms':>13}{'speed-up':>10}")
    for tokens, d, r in STAGES:
        proj = torch.randn(batch, tokens, 4, r + 2, requires_grad=True)  # dt is a view, as cross_scan's split gives
        weight = torch.randn(4, d, r, requires_grad=True)
        grad = torch.randn(batch, tokens, 4, d)
        einsum = torch.einsum("blkr,kdr->blkd", proj[..., :r], weight)
        ours = _RouteDt.apply(proj[..., :r], weight)
        runs = {
            "einsum forward": lambda: torch.einsum("blkr,kdr->blkd", proj[..., :r], weight),
            "ours forward": lambda: _RouteDt.apply(proj[..., :r], weight),
            "einsum backward": lambda: torch.autograd.grad(einsum, (proj, weight), grad, retain_graph=True),
            "ours backward": lambda: torch.autograd.grad(ours, (proj, weight), grad, retain_graph=True),
        }
        t = time_interleaved(runs, repeats)
        for part in ("forward", "backward"):
            a, b = t[f"einsum {part}"], t[f"ours {part}"]
            print(f"{f'  L {tokens}, D {d}, R {r}: {part}':<30}{1e3 * a:>11.1f}{1e3 * b:>13.1f}{a / b:>9.2f}x")


def conv_weight_grad(batch: int, repeats: int) -> None:
    print(f"\n{'conv weight grad, batch ' + str(batch):<30}{'oneDNN ms':>11}{'GEMM ms':>13}{'speed-up':>10}")
    for cin, cout, size in CONVS:
        x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(cout, cin, 3, 3)
        grad = torch.randn(batch, cout, size // 2, size // 2).contiguous(memory_format=torch.channels_last)
        runs = {
            "onednn": lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, [2, 2], [1, 1], [1, 1], False,
                                                                 [0, 0], 1, [False, True, False]),
            "gemm": lambda: _weight_grad_gemm(x, grad, (3, 3), (2, 2), (1, 1)),
        }
        t = time_interleaved(runs, repeats)
        print(f"{f'  {cin} -> {cout} at {size}x{size}':<30}{1e3 * t['onednn']:>11.1f}{1e3 * t['gemm']:>13.1f}"
              f"{t['onednn'] / t['gemm']:>9.2f}x")


def main() -> None:
    args = timing_args(__doc__, **{"glibc-allocator": dict(action="store_true", help="glibc's malloc defaults")})
    kept = not args.glibc_allocator and keep_freed_memory()
    print(f"VMamba-T training parts, {torch.get_num_threads()} thread(s), best of {args.repeats}, freed memory "
          f"{'kept' if kept else 'returned (glibc defaults)'}")
    route_dt(args.batch, args.repeats)
    conv_weight_grad(args.batch, args.repeats)


if __name__ == "__main__":
    main()
