"""Two compiled parts of the native models' CPU inference, each against the path it replaced, side by side.

    python benchmarks/inference_parts.py [--batch 4] [--repeats 5] [--threads 1]

1. Vim-Ti's x and dt projections in streamed inference (197 tokens, d_inner 384 -> 44 columns, then
   dt_rank 12 -> 384): ``autotune.matmul`` (MKL, either way round) against ``scan_cpu.thin_matmul``,
   alone and in the whole model (``inference_mode``), with DeiT-Ti's forward for scale.
2. UniRepLKNet-T's depthwise convs (deploy form, whole model): the strategy timed fastest among
   PyTorch's layouts against the same with the compiled kernel as a candidate, with ConvNeXt-T's
   forward for scale.

Best of ``--repeats`` in milliseconds, interleaved (``timing.time_interleaved``: process CPU time
with one thread), freed memory kept as ``train.py`` runs. Read the ratios: absolute times move with
the machine's load.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arena.allocator import keep_freed_memory  # noqa: E402
from backbones import create_backbone  # noqa: E402
from backbones.ops import large_kernel, scan_cpu  # noqa: E402
from backbones.vim import _projections  # noqa: E402
from timing import time_interleaved, timing_args  # noqa: E402


def _head(title: str, before: str, peer: str) -> str:
    return f"{title:<34}{before + ' ms':>11}{'kernel ms':>11}{'speed-up':>10}{peer + ' ms':>15}"


def _row(label: str, before: float, after: float, peer: float | None = None) -> str:
    peer_ms = "" if peer is None else f"{1e3 * peer:>15.1f}"
    return f"{label:<34}{1e3 * before:>11.2f}{1e3 * after:>11.2f}{before / after:>9.2f}x{peer_ms}"


def vim_projections(lib, batch: int, repeats: int) -> None:
    print(_head(f"Vim-Ti x + dt projections, batch {batch}", "BLAS", "DeiT-Ti"))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, 197, 384, generator=g)
    w_x, w_dt = torch.randn(44, 384, generator=g), torch.randn(384, 12, generator=g)
    w_x_thin, w_dt_t = scan_cpu.thin_weight(lib, w_x), w_dt.t().contiguous()
    t = time_interleaved({"blas": lambda: _projections(u, w_x, w_dt),
                          "kernel": lambda: scan_cpu.thin_matmul(lib, u, w_x_thin, 44, then=w_dt_t)}, repeats)
    print(_row("  197 x 384 -> 44, 12 -> 384", t["blas"], t["kernel"]))
    vim, deit = create_backbone("vim_tiny").eval(), timm.create_model("deit_tiny_patch16_224").eval()
    blas = copy.deepcopy(vim)
    x = torch.randn(batch, 3, 224, 224, generator=g)
    thin_vectors = scan_cpu.THIN_VECTORS
    with torch.inference_mode():
        try:  # the copy's kernel inputs are derived (once) as if its outputs were too wide: the BLAS path
            scan_cpu.THIN_VECTORS = 0
            blas(x)
        finally:
            scan_cpu.THIN_VECTORS = thin_vectors
        t = time_interleaved({"blas": lambda: blas(x), "kernel": lambda: vim(x), "deit": lambda: deit(x)}, repeats)
    print(_row("  vim_tiny, whole model", t["blas"], t["kernel"], t["deit"]))


def unireplknet_convs(batch: int, repeats: int) -> None:
    print("\n" + _head(f"UniRepLKNet-T deploy, batch {batch}", "PyTorch", "ConvNeXt-T"))
    model = create_backbone("unireplknet_t", deploy=True).eval()
    convnext = timm.create_model("convnext_tiny").eval()
    x = torch.randn(batch, 3, 224, 224)
    candidate = large_kernel._compiled_kernel

    def forward(compiled: bool) -> None:
        # without the compiled candidate the timed picks are among PyTorch's layouts (keys of their own)
        large_kernel._compiled_kernel = candidate if compiled else (lambda *args: None)
        model(x)

    try:
        with torch.inference_mode():
            t = time_interleaved({"torch": lambda: forward(False), "compiled": lambda: forward(True),
                                  "convnext": lambda: convnext(x)}, repeats)
    finally:
        large_kernel._compiled_kernel = candidate
    print(_row("  unireplknet_t, whole model", t["torch"], t["compiled"], t["convnext"]))


def main() -> None:
    args = timing_args(__doc__)
    lib = scan_cpu.kernel()
    if lib is None:
        sys.exit("inference_parts.py: the compiled kernels did not build (no C compiler, or ARENA_SCAN_KERNEL=torch)")
    kept = keep_freed_memory()
    print(f"inference parts, {torch.get_num_threads()} thread(s), best of {args.repeats}, freed memory "
          f"{'kept' if kept else 'returned (glibc defaults)'}")
    vim_projections(lib, args.batch, args.repeats)
    unireplknet_convs(args.batch, args.repeats)


if __name__ == "__main__":
    main()
