"""The GPU check: everything that only a GPU can tell, in one table, within a time budget.

    python benchmarks/gpu_check.py                    # one CUDA GPU: about 8 minutes at most
    python benchmarks/gpu_check.py --smoke            # the same code on CPU at tiny shapes (the tests run this)
    python benchmarks/gpu_check.py --parts b --json rows.json

Four parts, one row per check, each row catching its own failure:

* (a) ``train``: two training steps in bf16-mixed for one small model of each architecture x
  each task (classification, detection, segmentation), built by ``arena.run.build_run`` from
  the composed Hydra config as ``train.py`` builds it: pass/fail (both losses finite), the
  second step's time, peak memory. Vim and VMamba run their scans on the Triton kernel here.
* (b) ``scan``: the Triton selective scan against the pure-PyTorch scan
  (``ARENA_SCAN_KERNEL=torch``) at Vim-Ti shapes (batch 8, 2 directions x d_inner 384, d_state
  16, 197 tokens, gate z) and VMamba-T stage-1 shapes (batch 8, 4 routes x d_inner 192, d_state
  1, 56 x 56 tokens), forward and forward + backward: times, speed-up, largest relative
  difference of the output (and of every gradient).
* (c) ``bench``: ``arena bench`` (``arena.bench.bench_backbone``, bf16) inference and training
  of vim_tiny, deit_tiny, vmamba_tiny, swin_tiny and convnext_tiny (channels_last) at 224, and
  vim_tiny against deit_tiny at 1024 (the Vim paper reports 2.8x the speed and 86.8 % less
  memory than DeiT-Ti at 1248); then the same five at 224 under ``torch.compile``.
* (d) ``ddp``: one ``train.py trainer=ddp trainer.devices=-1`` run (two training batches, two
  test batches) on all visible GPUs, in a subprocess; pass when it exits 0 with a record.

A global budget (``--budget``, 480 s) guards the 8 minutes: a row whose expected cost does not fit
in what is left is reported as skipped, not started. The most wanted rows come first (b, a,
c eager, d, c compiled). ``--smoke`` runs on CPU with each architecture's ``*_test`` model, tiny
images and scans (the Triton scan then runs in Triton's interpreter) and no ``torch.compile``:
it proves the script, not the GPU. Exit status 1 when a row failed.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before triton is imported: the Triton scan runs on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import lightning as L  # noqa: E402

from arena.bench import BenchSettings, bench_backbone, time_step  # noqa: E402
from selective_scan import vim_inputs, with_kernel  # noqa: E402  (benchmarks/selective_scan.py)

# architecture -> its small model on the GPU (its ``<architecture>_test`` model under --smoke)
MODELS = {"coatnet": "coatnet_0", "convnext": "convnext_atto", "fastvit": "fastvit_t8", "glnet": "glnet_4g",
          "mambaout": "mambaout_femto", "maxvit": "maxvit_pico", "nextvit": "nextvit_small",
          "replknet": "replknet_31b", "resnet": "resnet50", "swin": "swin_tiny", "unireplknet": "unireplknet_a",
          "vim": "vim_tiny", "vit_comer": "vit_comer_tiny", "vit": "deit_tiny", "vmamba": "vmamba_tiny"}
TASKS = ("classification", "detection", "segmentation")
BENCH = ("vim", "vit", "vmamba", "swin", "convnext")  # (c), by architecture: vim_tiny, deit_tiny, ...
BENCH_GPU = {"vim": "vim_tiny", "vit": "deit_tiny", "vmamba": "vmamba_tiny", "swin": "swin_tiny",
             "convnext": "convnext_tiny"}
CHANNELS_LAST = {"convnext"}  # where channels_last applies: convolutions over NCHW maps
PARTS = "abcd"
# expected seconds per row on one GPU, checked against the budget before a row starts
COST = {"train": 8.0, "scan": 10.0, "bench": 20.0, "bench_compiled": 75.0, "ddp": 90.0}


@dataclass
class Row:
    part: str
    check: str
    status: str = "ok"  # or "FAIL: ...", "skipped: ..."
    ms: float | None = None  # the row's main time (see notes)
    peak_mib: float | None = None
    ratio: float | None = None  # (b) speed-up of Triton over PyTorch; (c) Vim's speed over DeiT's
    max_diff: float | None = None  # (b) largest relative difference from the PyTorch scan
    notes: str = ""


@dataclass(frozen=True)
class Setup:
    """Sizes of one check run: the GPU's, or tiny ones on CPU under --smoke."""

    device: torch.device
    smoke: bool
    train_batch: int
    train_size: int
    bench_batch: int
    bench_size: int
    bench_large: int
    large_batch: int

    def model(self, arch: str, table: dict[str, str] = MODELS) -> str:
        return f"{arch}_test" if self.smoke else table[arch]


def make_setup(smoke: bool) -> Setup:
    if smoke:
        return Setup(torch.device("cpu"), True, 2, 64, 2, 64, 128, 1)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --smoke to check the script on CPU")
    return Setup(torch.device("cuda"), False, 16, 224, 32, 224, 1024, 8)


class Budget:
    """The wall-clock budget shared by all rows."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_row(rows: list[Row], budget: Budget, cost: float, part: str, check: str, fn: Callable[[], dict]) -> Row:
    """Run one check (``fn`` returns its Row fields) unless its expected ``cost`` exceeds the budget left; its
    failure becomes its row."""
    if budget.left() < cost:
        row = Row(part, check, f"skipped: {max(0.0, budget.left()):.0f} s left of the budget, needs ~{cost:.0f} s")
    else:
        try:
            row = Row(part, check, **fn())
        except Exception as e:  # one failing check must not stop the others
            traceback.print_exc(file=sys.stderr)
            row = Row(part, check, f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    rows.append(row)
    print(_format(row), file=sys.stderr, flush=True)
    return row


# ---- (a) two training steps per architecture x task ----------------------------------------------------------


class StepClock(L.Callback):
    """Times every training step (device synchronised) and keeps its loss."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self._t0)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def compose_train(overrides: list[str], run_dir: Path):
    """The ``train`` config composed with ``overrides`` as ``train.py`` would, writing under ``run_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from arena.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def train_steps(setup: Setup, arch: str, task: str) -> dict:
    """Two bf16-mixed training steps of ``arch``'s model on ``task``, built as ``train.py`` builds a run."""
    from arena.run import build_run

    name, bs = setup.model(arch), setup.train_batch
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_train([
            f"backbone={name}", f"task={task}", "trainer=cpu" if setup.smoke else "trainer=gpu",
            f"trainer.precision={'32-true' if setup.smoke else 'bf16-mixed'}", "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=none", "~callbacks",
            f"data.image_size={setup.train_size}", f"data.batch_size={bs}", f"data.num_train={2 * bs}",
            f"data.num_val={bs}", f"data.num_test={bs}"], Path(run_dir))
        run = build_run(cfg, run_dir)
        clock = StepClock()
        run.trainer.callbacks.append(clock)
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(setup.device)
        run.trainer.fit(run.module, datamodule=run.datamodule)
    if len(clock.losses) != 2 or not all(math.isfinite(v) for v in clock.losses):
        return {"status": f"FAIL: losses {clock.losses} (two finite ones wanted)"}
    return dict(ms=1e3 * clock.times[-1], peak_mib=_peak_mib(setup.device),
                notes=f"2nd step, batch {bs} @{setup.train_size}; first step {1e3 * clock.times[0]:.0f} ms")


# ---- (b) the Triton scan against the pure-PyTorch scan -------------------------------------------------------


def scan_inputs(setup: Setup, shape: str) -> dict[str, torch.Tensor]:
    """Vim-Ti (2 directions as 2 groups, gate z) or VMamba-T stage 1 (4 routes, d_state 1, no gate) scan inputs."""
    batch, groups, d_inner, d_state, length, gate = {
        "Vim-Ti": (8, 2, 384, 16, 197, True), "VMamba-T": (8, 4, 192, 1, 56 * 56, False)}[shape]
    if setup.smoke:
        batch, d_inner, length = 1, 4, 20
    inputs = vim_inputs(batch, groups * d_inner, d_state, length)
    g = torch.Generator().manual_seed(1)
    inputs["B"], inputs["C"] = (torch.randn(batch, groups, d_state, length, generator=g) for _ in range(2))
    if not gate:
        del inputs["z"]
    return {k: v.to(setup.device) for k, v in inputs.items()}


def _scan_pass(fn: Callable, inputs: dict[str, torch.Tensor], backward: bool):
    """One call of ``fn`` (and its backward); returns the output and the gradients."""
    leaves = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True)
    if not backward:
        return y, {}
    y.backward(torch.cos(y.detach()))
    return y, {k: v.grad for k, v in leaves.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def scan_check(setup: Setup, shape: str, backward: bool) -> dict:
    """Time Triton and pure-PyTorch scans side by side; the largest relative difference over output and gradients."""
    inputs = scan_inputs(setup, shape)
    kernels = {k: with_kernel(k) for k in ("triton", "torch")}
    settings = BenchSettings(device=str(setup.device), warmup=0 if setup.smoke else 3, blocks=3,
                             block_time=0.05 if setup.smoke else 0.3)
    times, results = {}, {}
    for name, fn in kernels.items():
        results[name] = _scan_pass(fn, inputs, backward)
        times[name], _ = time_step(lambda: _scan_pass(fn, inputs, backward), setup.device, settings)
    (y, grads), (y_ref, grads_ref) = results["triton"], results["torch"]
    errors = {"y": _rel(y, y_ref), **{f"d{k}": _rel(grads[k], grads_ref[k]) for k in grads_ref}}
    worst = max(errors, key=errors.get)
    return dict(ms=1e3 * times["triton"], ratio=times["torch"] / times["triton"], max_diff=errors[worst],
                notes=f"Triton; PyTorch {1e3 * times['torch']:.2f} ms; largest difference in {worst}")


# ---- (c) arena bench -----------------------------------------------------------------------------------------


def bench_settings(setup: Setup, arch: str, compiled: bool, batch: int) -> BenchSettings:
    """bf16 on the GPU (fp32 under --smoke: quicker on CPU), channels_last where it applies, short timing."""
    return BenchSettings(batch_size=batch, device=str(setup.device), precision="fp32" if setup.smoke else "bf16",
                         channels_last=arch in CHANNELS_LAST, compile=compiled, warmup=2, blocks=3,
                         block_time=0.05 if setup.smoke else 0.3)


def bench(setup: Setup, arch: str, size: int, settings: BenchSettings, results: dict) -> dict:
    """``arena bench`` of one model: inference time and peak memory (training in the notes)."""
    r = bench_backbone(setup.model(arch, BENCH_GPU), size, settings)
    results[(arch, size, settings.compile)] = r
    return dict(ms=r["infer_step_time"], peak_mib=r["infer_peak_mem_mb"],
                notes=f"inference, batch {settings.batch_size}: {r['infer_samples_per_sec']:.0f} img/s; training "
                f"{r['train_step_time']:.1f} ms/step, {r['train_samples_per_sec']:.0f} img/s, "
                f"{r['train_peak_mem_mb']:.0f} MiB")


def vim_vs_deit(size: int, results: dict) -> Row:
    """The Vim paper's comparison from the two large-image rows: speed ratio and memory saved."""
    vim, deit = results.get(("vim", size, False)), results.get(("vit", size, False))
    if vim is None or deit is None:
        return Row("c", f"vim vs deit @{size}", "skipped: a bench row above is missing")
    speed = deit["infer_step_time"] / vim["infer_step_time"]
    saved = 100 * (1 - vim["infer_peak_mem_mb"] / deit["infer_peak_mem_mb"])
    return Row("c", f"vim vs deit @{size}", ratio=speed,
               notes=f"Vim: {speed:.2f}x DeiT's inference speed, {saved:.1f}% less memory (paper at 1248: 2.8x, 86.8%)")


# ---- (d) DDP on all visible GPUs -------------------------------------------------------------------------------


def ddp_step(setup: Setup, timeout: float) -> dict:
    """``train.py trainer=ddp`` for two training batches and two test batches; ok when it writes its record."""
    name = setup.model("convnext")
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"backbone={name}", "trainer=ddp", "trainer.devices=-1", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "trainer.limit_test_batches=2",
                     "trainer.enable_progress_bar=false", "data.num_train=64", "data.num_test=64",
                     f"data.batch_size={setup.train_batch}", f"hydra.run.dir={run_dir}"]
        if setup.smoke:  # two CPU processes over gloo
            overrides += ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                          "trainer.sync_batchnorm=false"]
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        record = Path(run_dir) / "metrics.json"
        if run.returncode != 0 or not record.exists():
            lines = run.stderr.strip().splitlines() or ["no output"]
            tail = next((x for x in reversed(lines) if "Error" in x or "Exception" in x), lines[-1])[-160:]
            return {"status": f"FAIL: exit {run.returncode}: {tail}", "ms": 1e3 * wall}
        metrics = json.loads(record.read_text())["metrics"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in list(metrics.items())[:2] if isinstance(v, (int, float)))
    return dict(ms=1e3 * wall, notes=f"whole run incl. start-up; test {shown}")


# ---- the table -------------------------------------------------------------------------------------------------


def _format(row: Row) -> str:
    cells = [f"{v:{spec}}" if v is not None else "" for v, spec in
             ((row.ms, ".2f"), (row.peak_mib, ".0f"), (row.ratio, ".2f"), (row.max_diff, ".1e"))]
    return f"| {row.part} | {row.check} | {row.status} | {' | '.join(cells)} | {row.notes} |"


def device_name(setup: Setup) -> str:
    if setup.device.type == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(setup.device)}"
    return f"CPU {platform.processor() or platform.machine()} (--smoke)"


def check(setup: Setup, parts: str, archs: list[str], budget: Budget) -> list[Row]:
    """Every row in priority order: b, a, c eager, d, c compiled."""
    rows: list[Row] = []
    results: dict = {}
    if "b" in parts:
        for shape in ("Vim-Ti", "VMamba-T"):
            for backward in (False, True):
                run_row(rows, budget, COST["scan"], "b", f"scan {shape} {'fwd+bwd' if backward else 'fwd'}",
                        lambda: scan_check(setup, shape, backward))
    if "a" in parts:
        for arch in archs:
            for task in TASKS:
                run_row(rows, budget, COST["train"], "a", f"train {setup.model(arch)} {task}",
                        lambda: train_steps(setup, arch, task))

    def bench_row(arch: str, size: int, compiled: bool, batch: int) -> None:
        settings = bench_settings(setup, arch, compiled, batch)
        how = ", ".join(k for k, on in (("compiled", compiled), ("channels_last", settings.channels_last)) if on)
        name = f"bench {setup.model(arch, BENCH_GPU)} @{size}{f' ({how})' if how else ''}"
        if compiled and setup.smoke:
            rows.append(Row("c", name, "skipped: torch.compile is checked on the GPU only"))
            return
        run_row(rows, budget, COST["bench_compiled" if compiled else "bench"], "c", name,
                lambda: bench(setup, arch, size, settings, results))

    if "c" in parts:
        for arch in BENCH:
            bench_row(arch, setup.bench_size, False, setup.bench_batch)
        for arch in ("vim", "vit"):
            bench_row(arch, setup.bench_large, False, setup.large_batch)
        rows.append(vim_vs_deit(setup.bench_large, results))
    if "d" in parts:
        devices = 2 if setup.smoke else torch.cuda.device_count()
        run_row(rows, budget, COST["ddp"], "d", f"ddp {setup.model('convnext')} x{devices}",
                lambda: ddp_step(setup, max(1.0, budget.left())))
    if "c" in parts:
        for arch in BENCH:
            bench_row(arch, setup.bench_size, True, setup.bench_batch)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, *_test models: checks the script itself")
    p.add_argument("--parts", default=PARTS, help="which parts to run, e.g. 'ab' (default: abcd)")
    p.add_argument("--archs", default=",".join(MODELS), help=f"architectures for (a), comma-separated "
                   f"(default: all: {','.join(MODELS)})")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all rows (default 480: 8 minutes)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    bad = set(args.parts) - set(PARTS) or set(args.archs.split(",")) - set(MODELS)
    if bad:
        p.error(f"unknown part or architecture {sorted(bad)}; parts are {PARTS}, architectures {', '.join(MODELS)}")
    setup = make_setup(args.smoke)
    budget = Budget(args.budget)
    rows = check(setup, args.parts, args.archs.split(","), budget)
    print(f"GPU check on {device_name(setup)}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"{time.monotonic() - budget.start:.0f} s of a {args.budget:.0f} s budget\n")
    print("| part | check | status | ms | peak MiB | ratio | max rel diff | notes |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(_format(r) for r in rows))
    failed = sum(r.status.startswith("FAIL") for r in rows)
    skipped = sum(r.status.startswith("skipped") for r in rows)
    print(f"\n{len(rows) - failed - skipped} ok, {failed} failed, {skipped} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
