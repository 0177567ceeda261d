"""Freed memory kept in the process (arena/allocator.py): a freed large block is reused without page faults."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from arena.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MiB, above glibc's largest mmap threshold: mapped anew each time by default
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# the heap grows a few times first (aligned blocks leave remainders that keep a freed block from the top),
# then serves every block from what it holds
last = [faults() for _ in range(30)][-10:]
print(kept, max(last) if kept else min(last))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_and_reused_without_page_faults() -> None:
    out = {}
    for mode in ("keep", "default"):
        run = subprocess.run([sys.executable, "-c", FAULTS.format(root=str(ROOT)), mode], capture_output=True,
                             text=True, check=True)
        kept, faults = run.stdout.split()
        out[mode] = (kept == "True", int(faults))
    assert out["keep"][0] and not out["default"][0]
    pages = (64 << 20) // 4096
    assert out["default"][1] > pages // 2  # each of the last 10: the fresh mapping faulted in again
    assert out["keep"][1] < pages // 20  # each of the last 10: a block the heap holds, no faults


def test_training_and_eval_keep_freed_memory_by_default(make_cfg) -> None:
    assert make_cfg().keep_freed_memory is True
