"""``benchmarks/gpu_check.py`` on CPU (``--smoke``): the GPU check is a tested script before any GPU runs it."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _smoke(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[int, list[dict]]:
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.exists(), run.stderr[-3000:]
    return run.returncode, json.loads(out.read_text())


def _module(monkeypatch):
    """The script imported as a module; what its import changes in ``sys`` is undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts its folders first
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 33 s under Triton's interpreter; the Triton scan itself is checked in test_selective_scan_triton.py
def test_scan_rows_compare_triton_with_pytorch(tmp_path):
    """Part (b) under Triton's interpreter: both shapes, forward and backward, matching the PyTorch scan."""
    rc, rows = _smoke(tmp_path, "--parts", "b")
    assert rc == 0
    assert [r["check"] for r in rows] == ["scan Vim-Ti fwd", "scan Vim-Ti fwd+bwd", "scan VMamba-T fwd",
                                          "scan VMamba-T fwd+bwd"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_diff"] < 1e-5 and r["ratio"] > 0 and r["ms"] > 0, r


def test_budget_skips_what_does_not_fit(tmp_path, monkeypatch):
    """With no budget left every row is listed as skipped, none started, and the run still succeeds."""
    module = _module(monkeypatch)
    rc, rows = _smoke(tmp_path, "--budget", "0")
    assert rc == 0
    assert all(r["status"].startswith("skipped") for r in rows)
    checks = {r["check"] for r in rows}
    assert {f"train {arch}_test {task}" for arch in module.MODELS for task in module.TASKS} <= checks
    assert len(rows) == 4 + 3 * len(module.MODELS) + 2 * len(module.BENCH) + 2 + 1 + 1


def test_a_failing_row_is_reported_and_the_rest_run(monkeypatch):
    module = _module(monkeypatch)
    rows, budget = [], module.Budget(60)

    def broken() -> dict:
        raise ValueError("bad shape 7")

    module.run_row(rows, budget, 1.0, "a", "broken", broken)
    module.run_row(rows, budget, 1.0, "a", "fine", lambda: {"ms": 2.0})
    assert [(r.check, r.status) for r in rows] == [("broken", "FAIL: ValueError: bad shape 7"), ("fine", "ok")]
    assert "| a | fine | ok | 2.00 |" in module._format(rows[1])


@pytest.mark.slow
def test_every_part_on_cpu(tmp_path):
    """Training steps, scans, bench rows and a 2-process gloo DDP run, all passing on CPU."""
    rc, rows = _smoke(tmp_path, "--archs", "convnext,vim,vmamba", "--budget", "3000", timeout=1500)
    failed = [r for r in rows if r["status"].startswith("FAIL")]
    assert rc == 0 and not failed, failed
    ok = {r["part"] for r in rows if r["status"] == "ok"}
    assert ok == {"a", "b", "c", "d"}
    assert sum(r["part"] == "a" and r["status"] == "ok" for r in rows) == 9
    ratio = next(r for r in rows if r["check"].startswith("vim vs deit"))
    assert ratio["status"] == "ok" and ratio["ratio"] > 0
