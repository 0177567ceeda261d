"""Timing shared by the side-by-side CPU benchmarks: common options and interleaved best-of-N timing."""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def timing_args(description: str | None, **extra: dict) -> argparse.Namespace:
    """Parse the options the large-kernel benchmarks share (batch, repeats, threads) plus ``extra``
    (name -> ``add_argument`` keywords), and apply ``--threads``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's choice)")
    for name, kw in extra.items():
        p.add_argument(f"--{name}", **kw)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     min_seconds: float = 0.0) -> dict[str, float]:
    """Best-of-N seconds of each callable, run round-robin so load changes hit all alike: N is
    ``repeats`` rounds, or more until the rounds have taken ``min_seconds`` (a short phase, e.g.
    batch-1 inference, otherwise fits inside one burst of another machine's load on a shared host).

    With one intra-op thread the clock is the process's CPU time, which leaves out the time the
    scheduler gives to other processes on a shared machine; with more threads it is wall time.
    The minimum, not the median: other processes only ever add time.
    """
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: min(t) for name, t in times.items()}
