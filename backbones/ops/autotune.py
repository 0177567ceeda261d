"""Pick the fastest of equivalent implementations by timing them on their first call, per shape.

What is fast on a CPU depends on its vector ISA as much as on the shapes: PyTorch's NCHW
depthwise conv is 1.3-2.6x faster than channels-last at 13x13 on an AVX-512 CPU and 9-12x
slower on an AVX2 one; oneDNN's GELU fused into a GEMM saves a pass on AVX-512 and costs 5-30%
more than a separate GELU on AVX2. So, as ``torch.backends.cudnn.benchmark`` does on GPUs,
``fastest`` times the candidates once per key (sizes rounded up to powers of two by ``bucket``,
dtype, threads, ...) and keeps the pick for the rest of the process. The candidates compute the
same function; only rounding may differ.

``ARENA_AUTOTUNE=0`` turns timing off (every key takes its default), for runs that must pick the
same way on every machine; so does ``torch.use_deterministic_algorithms(True)`` (Lightning's
``trainer.deterministic=true``), since picks timed anew in a resumed process could differ and
change results at rounding level. Nothing is timed while compiling or inside a dispatch mode (FLOP
counting, fake tensors), where the default is taken too.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Hashable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# A candidate this many times slower than another on its first call is not timed further.
CLEAR_MARGIN = 4.0
ROUNDS = 5  # timed rounds after the first call, the best counting
_PICKS: dict[Hashable, str] = {}


def enabled() -> bool:
    """``ARENA_AUTOTUNE``: '1' (the default) times candidates, '0' takes every default; off too under
    ``torch.use_deterministic_algorithms`` (Lightning's ``deterministic=True``), as cuDNN's benchmark is."""
    value = os.environ.get("ARENA_AUTOTUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"ARENA_AUTOTUNE must be '1' (time candidates on first use) or '0' (defaults), got {value!r}")
    return value == "1" and not torch.are_deterministic_algorithms_enabled()


def intercepted() -> bool:
    """Whether ops are being traced or intercepted (compiling, a dispatch mode: FLOP counting, fake tensors):
    nothing is timed then, and a call into a compiled library would bypass what is watching."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two: sizes in keys, so that inputs of varying size (detection,
    multi-scale training) share picks instead of timing every new size."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fastest(key: Hashable, runs: dict[str, Callable[[], object]], default: str) -> str:
    """The name of the fastest callable in ``runs`` for ``key``, timed (without autograd) on the first call.

    Each runs once, round-robin; unless one took ``CLEAR_MARGIN`` times another's time, ``ROUNDS`` more
    rounds follow, in reverse order every other round (a candidate run right after another finds the
    operands it shares in cache: the order must not favour one), and the best time of each counts.
    ``default`` (a key of ``runs``) is returned untimed when tuning is off, while compiling, or inside a
    dispatch mode.
    """
    if default not in runs:
        raise ValueError(f"default {default!r} is not one of the candidates {sorted(runs)}")
    if not enabled() or intercepted():
        return default
    key = (key, torch.get_num_threads())
    if key not in _PICKS:
        with torch.no_grad():
            times = {name: [_seconds(fn)] for name, fn in runs.items()}
            firsts = [t[0] for t in times.values()]
            if max(firsts) < CLEAR_MARGIN * min(firsts):
                for i in range(ROUNDS):
                    for name, fn in (reversed if i % 2 == 0 else iter)(list(runs.items())):
                        times[name].append(_seconds(fn))
        _PICKS[key] = min(times, key=lambda name: min(times[name]))
    return _PICKS[key]


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 2-D CPU tensors, contiguous: computed as written or as ``(b.T @ a.T).T`` copied back,
    whichever ``fastest`` times faster for the shapes and layouts. BLAS speed is not symmetric in the
    two: with an output 12-44 wide (Vim's x and dt projections and their gradients) MKL runs one of
    them up to 2.3x faster than the other (Zen 3), not always the same one."""
    runs = {"direct": lambda: a @ b, "transposed": lambda: (b.t() @ a.t()).t().contiguous()}
    key = ("matmul", bucket(a.shape[0]), a.shape[1], bucket(b.shape[1]), a.stride(0) == 1, b.stride(0) == 1,
           a.dtype)
    return runs[fastest(key, runs, default="direct")]()


__all__ = ["CLEAR_MARGIN", "ROUNDS", "bucket", "enabled", "fastest", "intercepted", "matmul"]
