"""The native state-space and large-kernel models against their timm peers on this CPU, side by side.

    python benchmarks/peers.py [--threads 1] [--repeats 5] [--min-seconds 20] [--quick]

One process prints, in this order:

1. the machine's fp32 matmul rate (a square GEMM of ``--matmul-size``, best of ``--repeats``);
2. every model's inference img/s at batch 1 and 8, all models timed round-robin in one loop
   (``benchmarks/timing.py``), and training img/s at batch 8 (224 px; a step is forward, a loss
   on every returned level, backward, SGD), each pair with a training target round-robin in its
   own loop (a round of Vim-Ti and DeiT-Ti, whose ratio has the thinnest margin, takes about
   2.5 s, one of all four trained models 10 s: 8 rounds in ``--min-seconds`` instead of 5),
   the matmul rate again, with a warning when it moved by more than 15% (another process took
   the machine during the run: its ratios are not to be read), and each model's share of the
   matmul rate (the higher of the two) in inference (FLOPs per image from
   ``arena.bench.count_flops`` x img/s / matmul rate);
3. the ratios of each pair with the target each must reach: vim_tiny / timm deit_tiny,
   vmamba_tiny / swin_tiny and / convnext_tiny, unireplknet_t (deploy form) / convnext_tiny, and
   the ratio each pair would have at equal FLOP/s (the peer's FLOPs over the model's): how
   efficient the model must be against its peer to reach the target (Vim-Ti counts 1.7x
   DeiT-Ti's FLOPs: 0.5x needs 85% of DeiT-Ti's FLOP rate; UniRepLKNet-T 1.1x ConvNeXt-T's:
   0.9x needs 99%);
4. Vim-Ti vs DeiT-Ti at 1024 px, batch 1: time (timed like the above) and peak memory (the
   resident-set rise of one pass, measured by ``benchmarks/resolution_scaling.py`` in a child
   process);
5. the selective scan at Vim-Ti's shapes against the arithmetic of upstream ``mamba_ssm``'s
   ``selective_scan_ref`` (``benchmarks/selective_scan.py``).

With one thread (the default) the clock is the process's CPU time, which leaves out the time
other processes take on a shared machine; times are the best of ``--repeats`` rounds, or of more
when a phase's rounds took less than ``--min-seconds`` (batch-1 inference: about 3 s for 5 rounds,
short enough for one burst of a neighbour's load on a shared host to slow them all). Read the ratios:
absolute rates move with the machine's load. ``--quick`` is a smoke test (one repeat, 512 px
instead of 1024, batch 2 instead of 8); its numbers are not the figures. Freed memory is kept in
the process (``arena/allocator.py``), as ``train.py`` and ``arena bench`` run, for every model alike;
``--glibc-allocator`` measures with glibc's defaults instead, where models with large activations
(VMamba) fault their memory in again every step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from arena.allocator import add_allocator_option, keep_freed_memory  # noqa: E402
from arena.bench import count_flops  # noqa: E402
from backbones import create_backbone  # noqa: E402
from resolution_scaling import build as build_resolution_models  # noqa: E402
from selective_scan import measure as measure_scan, vim_inputs  # noqa: E402
from timing import time_interleaved  # noqa: E402

# label -> (registered name, constructor overrides)
MODELS = {
    "vim_tiny": ("vim_tiny", {}),
    "deit_tiny": ("deit_tiny", {}),
    "vmamba_tiny": ("vmamba_tiny", {}),
    "swin_tiny": ("swin_tiny", {}),
    "convnext_tiny": ("convnext_tiny", {}),
    "unireplknet_t deploy": ("unireplknet_t", {"deploy": True}),
}
# (model, peer, inference target, training target or None)
PAIRS = [
    ("vim_tiny", "deit_tiny", 0.5, 0.5),
    ("vmamba_tiny", "swin_tiny", 0.7, 0.7),
    ("vmamba_tiny", "convnext_tiny", None, None),
    ("unireplknet_t deploy", "convnext_tiny", 0.9, None),
]
SHARE_TARGET = 0.35  # of the matmul rate, every native model in inference at batch 8
DRIFT = 0.15  # a change of the matmul rate between before and after the timings that is reported as a disturbed run
NATIVE = ("vim_tiny", "vmamba_tiny", "unireplknet_t deploy")


def cpu_model() -> str:
    """The CPU as Linux reports it (model name, family and model numbers) and the vector ISA PyTorch uses:
    one model name ("AMD EPYC") covers CPUs from AVX2 to AVX-512, and the figures differ between them."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    family = f"family {fields['cpu family']} model {fields['model']}, " if "cpu family" in fields else ""
    return f"{name} ({family}{torch.backends.cpu.get_cpu_capability()})"


def matmul_rate(size: int, repeats: int) -> float:
    """fp32 GEMM rate (FLOP/s) of a ``size`` x ``size`` square product, best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]
    return 2 * size ** 3 / best


def inference_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        with torch.inference_mode():
            model(x)
    return step


def training_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Forward, the mean of every level summed as the loss, backward, SGD step (``arena bench``'s step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        sum(f.mean() for f in model(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ratio_cell(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.2f}x"
    return f"{value:.2f}x {'ok' if value >= target else 'MISS'} (>= {target})"


def resolution(size: int, repeats: int, min_seconds: float) -> list[str]:
    """Vim-Ti vs DeiT-Ti at ``size`` px, batch 1: time here, peak memory from ``resolution_scaling.py``."""
    models = build_resolution_models()
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        t = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, min_seconds=min_seconds)
    child = subprocess.run([sys.executable, str(HERE / "resolution_scaling.py"), "--sizes", str(size), "--threads",
                            str(torch.get_num_threads()), "--memory-json"], capture_output=True, text=True,
                           check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    mem = json.loads(child.stdout.strip().splitlines()[-1])[str(size)]
    time_ratio, mem_ratio = t["Vim-Ti"] / t["DeiT-Ti"], mem["Vim-Ti"] / mem["DeiT-Ti"]
    return [f"{'':<22}{'DeiT-Ti':>10}{'Vim-Ti':>10}{'Vim / DeiT':>12}  target",
            f"{'time ms':<22}{1e3 * t['DeiT-Ti']:>10.0f}{1e3 * t['Vim-Ti']:>10.0f}{time_ratio:>11.2f}x  <= 0.8 "
            f"{'ok' if time_ratio <= 0.8 else 'MISS'}",
            f"{'peak memory MiB':<22}{mem['DeiT-Ti']:>10.1f}{mem['Vim-Ti']:>10.1f}{mem_ratio:>11.2f}x  <= 0.5 "
            f"{'ok' if mem_ratio <= 0.5 else 'MISS'}"]


def scan(batch: int, repeats: int) -> list[str]:
    """The fused scan and the project's reference against the upstream-style reference, fwd and fwd + bwd."""
    names = ["upstream-style", "reference", "fast, fused"]
    med, _ = measure_scan(names, vim_inputs(batch, 384, 16, 197), repeats)
    base = med["upstream-style"]
    lines = [f"{'implementation':<22}{'forward ms':>12}{'fwd+bwd ms':>12}{'vs upstream-style fwd':>23}"
             f"{'fwd+bwd':>9}"]
    for name in names:
        f, t = med[name]
        lines.append(f"{name:<22}{1e3 * f:>12.1f}{1e3 * t:>12.1f}{base[0] / f:>22.1f}x{base[1] / t:>8.1f}x")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's choice)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per model; the best counts")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="more passes until each timed phase has taken this long (wall time)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--large", type=int, default=1024, help="the resolution of the Vim-Ti / DeiT-Ti comparison")
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, batch 2, 512 px")
    add_allocator_option(p)
    args = p.parse_args()
    kept = not args.glibc_allocator and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, batch, large = (1, 2, 512) if args.quick else (args.repeats, 8, args.large)
    min_seconds = 0.0 if args.quick else args.min_seconds
    print(f"benchmarks/peers.py: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"best of {repeats}+ ({'CPU' if torch.get_num_threads() == 1 else 'wall'} time), "
          f"{datetime.date.today()}{', QUICK (not figures)' if args.quick else ''}; freed memory "
          f"{'kept (arena/allocator.py, as train.py runs)' if kept else 'returned (glibc defaults)'}")
    rate = matmul_rate(args.matmul_size, max(repeats, 3))
    print(f"fp32 matmul {args.matmul_size}x{args.matmul_size}: {rate / 1e9:.1f} GFLOP/s\n")

    torch.manual_seed(0)
    models = {label: create_backbone(name, **kw) for label, (name, kw) in MODELS.items()}
    flops = {label: count_flops(m, args.size) for label, m in models.items()}
    x = {b: torch.randn(b, 3, args.size, args.size) for b in (1, batch)}
    for m in models.values():
        m.eval()
    img_s = {}
    for b in (1, batch):
        t = time_interleaved({k: inference_step(m, x[b]) for k, m in models.items()}, repeats, min_seconds=min_seconds)
        img_s[f"infer {b}"] = {k: b / s for k, s in t.items()}
    img_s[f"train {batch}"] = {}
    for pair in [(model, peer) for model, peer, _, train_target in PAIRS if train_target is not None]:
        for k in pair:
            models[k].train()
        t = time_interleaved({k: training_step(models[k], x[batch]) for k in pair}, repeats, min_seconds=min_seconds)
        img_s[f"train {batch}"].update({k: batch / s for k, s in t.items()})
    rate_after = matmul_rate(args.matmul_size, max(repeats, 3))
    print(f"fp32 matmul after the {args.size} px timings: {rate_after / 1e9:.1f} GFLOP/s")
    if abs(rate_after / rate - 1) > DRIFT:
        print(f"WARNING: the machine's speed changed during the run (matmul {rate / 1e9:.1f} -> {rate_after / 1e9:.1f} "
              f"GFLOP/s): another process competed for the cores or the caches; the ratios below may be off, run "
              f"again before reading them")
    rate = max(rate, rate_after)  # the shares against the undisturbed rate
    print()

    cols = list(img_s)
    print(f"{args.size} px, img/s (share of the matmul rate in inference)")
    print(f"{'model':<22}{'GFLOPs':>8}" + "".join(f"{c:>20}" for c in cols))
    for k in models:
        cells = []
        for c in cols:
            v = img_s[c].get(k)
            share = f" ({100 * flops[k] * v / rate:3.0f}%)" if v is not None and c.startswith("infer") else ""
            cells.append("-" if v is None else f"{v:.2f}{share}")
        print(f"{k:<22}{flops[k] / 1e9:>8.2f}" + "".join(f"{c:>20}" for c in cells))
    print()
    print(f"{'ratio':<36}" + "".join(f"{c:>24}" for c in cols) + f"{'at equal FLOP/s':>18}")
    for model, peer, infer_target, train_target in PAIRS:
        cells = [ratio_cell(img_s[c][model] / img_s[c][peer], infer_target if c.startswith("infer") else train_target)
                 if model in img_s[c] and peer in img_s[c] else "-" for c in cols]
        parity = f"{flops[peer] / flops[model]:.2f}"  # the ratio if both ran their FLOPs at the same rate
        print(f"{model + ' / ' + peer:<36}" + "".join(f"{c:>24}" for c in cells) + f"{parity:>18}")
    shares = {k: flops[k] * img_s[f"infer {batch}"][k] / rate for k in NATIVE}
    print(f"native models at >= {SHARE_TARGET:.0%} of the matmul rate, inference batch {batch}: "
          + ", ".join(f"{k} {v:.0%} {'ok' if v >= SHARE_TARGET else 'MISS'}" for k, v in shares.items()))
    del models

    print(f"\nVim-Ti vs DeiT-Ti at {large} px, batch 1, inference")
    print("\n".join(resolution(large, repeats, min_seconds)))
    scan_batch = 1 if args.quick else 2
    print(f"\nselective scan at Vim-Ti shapes (batch {scan_batch}, d_inner 384, d_state 16, 197 tokens), "
          f"median of {repeats}")
    print("\n".join(scan(scan_batch, repeats)))


if __name__ == "__main__":
    main()
