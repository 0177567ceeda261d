"""Vim-Ti vs DeiT-Ti as the input grows: inference time per image and peak memory, side by side.

    python benchmarks/resolution_scaling.py [--sizes 224 512 768 1024] [--repeats 1] [--threads N]

Both models run in the same process, one batch of 1 image at a time, eval mode, no autograd,
after a warm-up pass at 224,
fp32 on CPU, randomly initialized (weights do not change the cost). DeiT-Ti is timm's
``deit_tiny_patch16_224`` with ``dynamic_img_size=True`` (its attention is
``F.scaled_dot_product_attention``); Vim-Ti is ``create_backbone("vim_tiny")``'s ``embed``
(class token), so both run their full network.

Peak memory is the growth of the process's resident set during one forward pass: the kernel's
high-water mark (``VmHWM``) is reset just before the pass (``/proc/self/clear_refs``, Linux) and
read after it, minus the resident size before it (weights, input and everything else already
there). PyTorch's CPU tensors come from the C allocator; the script re-runs itself with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every block of 64 KiB or more is mapped when allocated
and unmapped when freed (glibc otherwise raises the threshold and keeps freed blocks), so the
resident set follows the live tensors: this is the memory the pass needed at its worst moment,
allocator overhead included, measured the same way for both models.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import create_backbone  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(fn, x: torch.Tensor) -> tuple[float, float]:
    """Seconds of ``fn(x)`` and how far the resident set rose above its starting size (MiB) meanwhile."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn(x)
    seconds = time.perf_counter() - t0
    return seconds, (_status_kib("VmHWM") - before) / 1024


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see the module docstring
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 768, 1024])
    p.add_argument("--repeats", type=int, default=1, help="passes per model and size (median time, max memory)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True, num_classes=0).eval()
    vim = create_backbone("vim_tiny").eval()
    models = {"DeiT-Ti": deit, "Vim-Ti": vim.embed}
    with torch.inference_mode():
        for m in models.values():  # warm-up: first calls of every kernel, at a small size
            m(torch.randn(1, 3, 224, 224))
    print(f"batch 1, fp32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'size':>6}{'tokens':>8}{'DeiT-Ti ms':>12}{'Vim-Ti ms':>11}{'Vim/DeiT':>10}"
          f"{'DeiT-Ti MiB':>13}{'Vim-Ti MiB':>12}{'Vim/DeiT':>10}")
    rows = []
    with torch.inference_mode():
        for size in args.sizes:
            x = torch.randn(1, 3, size, size)
            runs = {k: [measure(m, x) for _ in range(args.repeats)] for k, m in models.items()}
            t = {k: statistics.median(s for s, _ in r) for k, r in runs.items()}
            mem = {k: max(m for _, m in r) for k, r in runs.items()}
            rows.append((size, t, mem))
            print(f"{size:>6}{(size // 16) ** 2 + 1:>8}{1e3 * t['DeiT-Ti']:>12.0f}{1e3 * t['Vim-Ti']:>11.0f}"
                  f"{t['Vim-Ti'] / t['DeiT-Ti']:>10.2f}{mem['DeiT-Ti']:>13.1f}{mem['Vim-Ti']:>12.1f}"
                  f"{mem['Vim-Ti'] / mem['DeiT-Ti']:>10.2f}", flush=True)
    for what, idx in (("time", 1), ("peak memory", 2)):
        faster = [size for size, *vals in rows if vals[idx - 1]["Vim-Ti"] <= vals[idx - 1]["DeiT-Ti"]]
        sizes = ", ".join(map(str, faster)) if faster else "at no size tried"
        print(f"Vim-Ti at or below DeiT-Ti in {what}: {sizes}")


if __name__ == "__main__":
    main()
