"""Keep freed memory in the process: glibc's malloc told to serve every block from its heap and never trim it.

By default glibc hands large blocks back to the system when they are freed: blocks above its mmap
threshold (which adapts, up to 32 MiB) are unmapped, and free memory at the top of the heap is
trimmed. A training step allocates the same activations every time, so each step then faults all
of that memory in again, page by page, zeroed by the kernel. Models with large activations pay most:
VMamba-T's four-route tensors at stage 1 are 77 MB each at batch 8, and one of its training steps
took about 600,000 page faults and 5.0 s on one core, against 3.8 s with freed memory kept
(docs/state-space.md). Swin-T and DeiT-Ti fault little either way. PyTorch's CPU performance guides
reach the same end by preloading a caching allocator (jemalloc, tcmalloc); this needs nothing
installed. The cost: the process keeps its peak memory until it exits (what a caching allocator
does too). On other C libraries it does nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_MAX`` to 0 (no block is mapped on its own) and ``M_TRIM_THRESHOLD`` to its
    largest value (the heap never shrinks), for this process and the processes it forks. Returns whether
    it applied: False off Linux, on another C library, or if glibc refused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--glibc-allocator``, for the commands that time models as ``train.py`` runs them (freed memory kept)."""
    parser.add_argument("--glibc-allocator", action="store_true",
                        help="leave glibc's malloc at its defaults (default: freed memory kept, as train.py runs)")
