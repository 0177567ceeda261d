"""The side-by-side benchmark scripts run end to end and print what they promise."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_peers_quick_prints_the_matmul_rate_first_then_every_pair():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert re.match(r"fp32 matmul 1024x1024: \d+\.\d GFLOP/s", lines[1])
    for pair in ("vim_tiny / deit_tiny", "vmamba_tiny / swin_tiny", "vmamba_tiny / convnext_tiny",
                 "unireplknet_t deploy / convnext_tiny"):
        row = next(line for line in lines if line.startswith(pair))
        ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", row)]
        assert len(ratios) == (3 if "swin" in pair or "deit" in pair else 2) and all(r > 0 for r in ratios)
    shares = re.findall(r"(\w[\w ]*?) (\d+)% (?:ok|MISS)", next(line for line in lines if line.startswith("native")))
    assert [name for name, _ in shares] == ["vim_tiny", "vmamba_tiny", "unireplknet_t deploy"]
    time_row = next(line for line in lines if line.startswith("time ms"))
    memory_row = next(line for line in lines if line.startswith("peak memory MiB"))
    assert float(time_row.split()[2]) > 0 and float(memory_row.split()[3]) > 0
    scan = {line.split()[0]: line for line in lines if line.startswith(("upstream-style", "fast, fused"))}
    assert set(scan) == {"upstream-style", "fast,"}
