"""The side-by-side benchmark scripts run end to end and print what they promise."""
from __future__ import annotations

import re
import subprocess
import sys
import time
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
    assert any(re.match(r"fp32 matmul after the 224 px timings: \d+\.\d GFLOP/s", line) for line in lines)
    # the last column: the ratio at equal FLOP/s, the peer's FLOPs over the model's (fixed by the architectures)
    for pair, parity in (("vim_tiny / deit_tiny", 0.59), ("vmamba_tiny / swin_tiny", 0.93),
                         ("vmamba_tiny / convnext_tiny", 0.92), ("unireplknet_t deploy / convnext_tiny", 0.91)):
        row = next(line for line in lines if line.startswith(pair))
        ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", row)]
        assert len(ratios) == (3 if "swin" in pair or "deit" in pair else 2) and all(r > 0 for r in ratios)
        assert float(row.split()[-1]) == parity
    shares = re.findall(r"(\w[\w ]*?) (\d+)% (?:ok|MISS)", next(line for line in lines if line.startswith("native")))
    assert [name for name, _ in shares] == ["vim_tiny", "vmamba_tiny", "unireplknet_t deploy"]
    time_row = next(line for line in lines if line.startswith("time ms"))
    memory_row = next(line for line in lines if line.startswith("peak memory MiB"))
    assert float(time_row.split()[2]) > 0 and float(memory_row.split()[3]) > 0
    scan = {line.split()[0]: line for line in lines if line.startswith(("upstream-style", "fast, fused"))}
    assert set(scan) == {"upstream-style", "fast,"}


def test_time_interleaved_runs_rounds_until_min_seconds():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import time_interleaved

    calls = {"a": 0, "b": 0}

    def fn(name):
        def run():
            calls[name] += 1
            time.sleep(0.005)
        return run

    best = time_interleaved({"a": fn("a"), "b": fn("b")}, repeats=2, warmup=1, min_seconds=0.1)
    assert set(best) == {"a", "b"} and all(t >= 0 for t in best.values())
    assert calls["a"] == calls["b"] >= 1 + 5  # warm-up + rounds until 0.1 s had passed (>= 0.01 s each), not 2
    calls.update(a=0, b=0)
    time_interleaved({"a": fn("a"), "b": fn("b")}, repeats=2, warmup=0)
    assert calls == {"a": 2, "b": 2}


def test_vmamba_training_parts_prints_every_stage_and_conv():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vmamba_training_parts.py"), "--batch", "1",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 4 * 2 + 4  # forward and backward at four stages, four convs
    for row in rows:
        *times, speed_up = row.split()[-3:]
        assert all(float(t) > 0 for t in times) and float(speed_up.rstrip("x")) > 0


def test_large_kernel_conv_times_every_strategy_and_the_pick():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "large_kernel_conv.py"), "--kernels", "13",
                          "--batch", "1", "--repeats", "1", "--threads", "1"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.split()[:1] == ["13"]]
    assert [r[1] for r in rows] == ["128", "256", "512", "1024"]
    header = run.stdout.splitlines()[1].split()
    strategies = header[3:header.index("x")]  # ms columns, then "x <strategy>" ratios
    assert strategies[:3] == ["plain", "channels_last", "fft"]
    assert all(r[-2] in strategies and r[-1] in strategies for r in rows)  # fastest, picked
    assert "picked strategy fastest (or within 10%) in" in run.stdout


def test_inference_parts_prints_both_parts_with_their_peers():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_parts.py"), "--batch", "1",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = {line.split(",")[0].split()[0]: line.split() for line in run.stdout.splitlines() if line.startswith("  ")}
    assert set(rows) == {"197", "vim_tiny", "unireplknet_t"}
    for name, row in rows.items():
        peer = name != "197"  # the whole-model rows end with the timm peer's forward
        before, after, speed_up = row[-4:-1] if peer else row[-3:]
        assert float(before) > 0 and float(after) > 0 and speed_up.endswith("x") and float(speed_up[:-1]) > 0
        assert not peer or float(row[-1]) > 0
