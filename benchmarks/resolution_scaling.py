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
there). PyTorch's CPU tensors come from the C allocator; memory is measured in a second process
run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every block of 64 KiB or more is mapped when
allocated and unmapped when freed (glibc otherwise raises the threshold and keeps freed blocks),
so the resident set follows the live tensors: this is the memory the pass needed at its worst
moment, allocator overhead included, measured the same way for both models. Times come from
this process, with the allocator's default settings: mapping and unmapping every block costs
page faults that would slow down whichever model allocates more.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import create_backbone  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mib(fn, x: torch.Tensor) -> float:
    """How far the resident set rose above its starting size (MiB) while ``fn(x)`` ran."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    before = _status_kib("VmRSS")
    fn(x)
    return (_status_kib("VmHWM") - before) / 1024


def seconds(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def build() -> dict:
    """Both models, randomly initialized, warmed up at 224 (first calls of every kernel)."""
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True, num_classes=0).eval()
    models = {"DeiT-Ti": deit, "Vim-Ti": create_backbone("vim_tiny").eval().embed}
    with torch.inference_mode():
        for m in models.values():
            m(torch.randn(1, 3, 224, 224))
    return models


def run(measure, sizes: list[int], repeats: int, combine) -> dict[int, dict[str, float]]:
    """``combine`` over ``repeats`` of ``measure(model, input)``, per size and model."""
    models = build()
    with torch.inference_mode():
        return {size: {k: combine([measure(m, torch.randn(1, 3, size, size)) for _ in range(repeats)])
                       for k, m in models.items()} for size in sizes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 768, 1024])
    p.add_argument("--repeats", type=int, default=1, help="passes per model and size (median time, max memory)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--memory-json", action="store_true", help=argparse.SUPPRESS)  # the memory process
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_json:
        print(json.dumps(run(peak_mib, args.sizes, args.repeats, max)))
        return
    child = subprocess.run([sys.executable, *sys.argv, "--memory-json"], capture_output=True, text=True, check=True,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    mem = {int(k): v for k, v in json.loads(child.stdout.strip().splitlines()[-1]).items()}
    time_s = run(seconds, args.sizes, args.repeats, statistics.median)
    print(f"batch 1, fp32, CPU, {torch.get_num_threads()} threads, median time / max memory of {args.repeats}")
    print(f"{'size':>6}{'tokens':>8}{'DeiT-Ti ms':>12}{'Vim-Ti ms':>11}{'Vim/DeiT':>10}"
          f"{'DeiT-Ti MiB':>13}{'Vim-Ti MiB':>12}{'Vim/DeiT':>10}")
    for size in args.sizes:
        t, m = time_s[size], mem[size]
        print(f"{size:>6}{(size // 16) ** 2 + 1:>8}{1e3 * t['DeiT-Ti']:>12.0f}{1e3 * t['Vim-Ti']:>11.0f}"
              f"{t['Vim-Ti'] / t['DeiT-Ti']:>10.2f}{m['DeiT-Ti']:>13.1f}{m['Vim-Ti']:>12.1f}"
              f"{m['Vim-Ti'] / m['DeiT-Ti']:>10.2f}")
    for what, table in (("time", time_s), ("peak memory", mem)):
        sizes = [size for size in args.sizes if table[size]["Vim-Ti"] <= table[size]["DeiT-Ti"]]
        print(f"Vim-Ti at or below DeiT-Ti in {what}: {', '.join(map(str, sizes)) or 'at no size tried'}")


if __name__ == "__main__":
    main()
