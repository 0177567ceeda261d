"""`arena bench`: exact FLOPs (custom ops included), the timm-compatible schema, CPU peak memory."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from arena.bench import (COLUMNS, TIMM_COLUMNS, BenchSettings, TensorMemoryPeak, count_flops, count_params,
                         resolve_backbones, run_bench)
from arena.cli import main as cli_main
from backbones import create_backbone
from backbones.ops.selective_scan import selective_scan, selective_scan_macs

FAST = BenchSettings(batch_size=2, warmup=1, blocks=3, block_time=0.01)


class _LastDimLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # (1, 3, 4, 8) -> (1, 3, 4, 5)


class _Scan(nn.Module):
    """One selective scan over the input's pixels: its FLOPs come only from the op's registered formula."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(-torch.ones(3, 4))
        self.D = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.flatten(2)
        bc = u.new_zeros(u.shape[0], 4, u.shape[2])
        return selective_scan(u, u, self.A, bc, bc, self.D)


def test_flops_of_known_layers_are_exact() -> None:
    assert count_flops(nn.Conv2d(3, 8, 3, padding=1, bias=False), 16) == 2 * 8 * 16 * 16 * 3 * 3 * 3
    assert count_flops(_LastDimLinear(), (4, 8)) == 2 * 3 * 4 * 8 * 5
    assert count_flops(nn.Conv2d(3, 8, 1, bias=False), 4, batch_size=3) == 3 * 2 * 8 * 16 * 3


def test_custom_op_flops_come_from_its_registered_formula() -> None:
    assert count_flops(_Scan(), 8) == 2 * selective_scan_macs(1, 3, 64, 4, with_D=True)


def test_cpu_peak_memory_counts_live_storages_exactly() -> None:
    with TensorMemoryPeak(resident=100) as m:
        a = torch.zeros(256)  # 1 KiB
        b = a + 1  # 1 KiB more: 2 KiB live
        view = b[:10]  # a view allocates nothing
        del a, b, view
        c = torch.zeros(384)  # 1.5 KiB after the others were freed
    assert m.peak == 100 + 2048
    assert m.current == 100 + 1536
    del c


def test_bench_rows_follow_timm_schema(tmp_path: Path) -> None:
    df = run_bench(["convnext_test"], [32, 64], FAST)
    assert list(df.columns) == list(COLUMNS) and set(TIMM_COLUMNS) <= set(df.columns)
    assert len(df) == 2 and df["error"].isna().all()
    model = create_backbone("convnext_test")
    for size, row in zip((32, 64), df.itertuples()):
        assert row.model == "convnext_test" and row.family == "baseline" and row.infer_img_size == size
        assert row.param_count == pytest.approx(count_params(model) / 1e6, abs=1e-3)
        assert row.infer_gmacs == pytest.approx(count_flops(model, size) / 2e9, abs=1e-4)
        assert row.infer_samples_per_sec == pytest.approx(2 / (row.infer_step_time / 1e3), rel=1e-2)
        assert row.train_samples_per_sec > 0 and row.train_batch_size == 2 and row.train_img_size == size
        weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        assert weights_mb < row.infer_peak_mem_mb < row.train_peak_mem_mb
    assert df["infer_peak_mem_mb"].iloc[1] > df["infer_peak_mem_mb"].iloc[0]  # activations grow with resolution


def test_bench_keeps_going_past_a_size_the_model_refuses() -> None:
    df = run_bench(["convnext_test"], [50], BenchSettings(batch_size=1, warmup=0, blocks=3, block_time=0.01, train=False))
    assert len(df) == 1 and "divisible by 32" in df["error"].iloc[0]


def test_cpu_clock_times_one_thread_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    df = run_bench(["convnext_test"], [32], BenchSettings(batch_size=2, warmup=1, blocks=3, block_time=0.01,
                                                          train=False, clock="cpu"))
    assert df["clock"].iloc[0] == "cpu" and df["threads"].iloc[0] == 1 and df["infer_samples_per_sec"].iloc[0] > 0
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="needs clock='wall'"):
        BenchSettings(device="cuda", clock="cpu")


def test_backbone_patterns_and_bad_names() -> None:
    assert resolve_backbones(["convnext_test", "convnext_t*"]) == ["convnext_test", "convnext_tiny"]
    with pytest.raises(ValueError, match=r"no registered backbone matches 'nothing_\*'"):
        resolve_backbones(["nothing_*"])
    with pytest.raises(ValueError, match="closest registered names: convnext_tiny"):
        resolve_backbones(["convnxt_tiny"])
    with pytest.raises(ValueError, match="precision must be one of"):
        BenchSettings(precision="fp8")


def test_bench_cli_writes_csv(tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    rc = cli_main(["bench", "convnext_test", "--img-size", "32", "--batch-size", "2", "--no-train", "--blocks", "3",
                   "--block-time", "0.01", "--warmup", "1", "--channels-last", "--precision", "bf16", "--out", str(out)])
    df = pd.read_csv(out)
    assert rc == 0 and list(df.columns) == list(COLUMNS)
    assert df["infer_samples_per_sec"].iloc[0] > 0 and df["train_samples_per_sec"].isna().all()
    assert df["precision"].iloc[0] == "bf16" and bool(df["channels_last"].iloc[0])


@pytest.mark.parametrize("name", ["unireplknet_test", "fastvit_test"])
def test_bench_times_inference_in_the_deploy_form(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As timm's ``benchmark.py --reparam``: the deploy form is counted and timed; training stays in train form."""
    model = create_backbone(name).eval()
    train_flops = count_flops(model, 32)
    with torch.no_grad():
        model.reparameterize()
    deploy_flops = count_flops(model, 32)
    assert deploy_flops < train_flops

    cls, calls = type(model), []
    original = cls.reparameterize

    def spy(self: nn.Module) -> None:
        calls.append(next(self.parameters()).device.type)
        original(self)

    monkeypatch.setattr(cls, "reparameterize", spy)
    row = run_bench([name], [32], FAST).iloc[0]
    assert row.infer_form == "deploy" and calls == ["meta", "cpu"]  # the FLOPs count, then the timed copy
    assert row.infer_gmacs == pytest.approx(deploy_flops / 2e9, abs=1e-4) and row.train_samples_per_sec > 0
    calls.clear()
    row = run_bench([name], [32], BenchSettings(batch_size=2, warmup=1, blocks=3, block_time=0.01, train=False,
                                                reparam=False)).iloc[0]
    assert row.infer_form == "train" and not calls
    assert row.infer_gmacs == pytest.approx(train_flops / 2e9, abs=1e-4)
    assert run_bench(["convnext_test"], [32], FAST)["infer_form"].iloc[0] == "train"  # nothing to reparameterize


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vmamba_test", "vim_test"])
def test_compiled_bench_times_the_state_space_models(name: str) -> None:
    """``--compile``: both forms trace through the fused CPU kernels (opaque ops) and run (about 30 s each)."""
    row = run_bench([name], [64], BenchSettings(batch_size=2, warmup=1, blocks=3, block_time=0.01, compile=True)).iloc[0]
    assert pd.isna(row["error"]) and row["compiled"]
    assert row["infer_samples_per_sec"] > 0 and row["train_samples_per_sec"] > 0
