"""Efficiency measurements: parameters, FLOPs, inference and training throughput, peak memory.

FLOPs are counted by running the model under ``FlopCounterMode``; custom ops register their
formula with ``register_flop_formula`` so they are not missed. Models are built on the ``meta``
device when only counts are wanted, so even large variants cost no memory or time.

Throughput is timed after explicit warm-up steps in several blocks of steps (each about
``block_time`` seconds, the device synchronised around it); the *median* block is reported, and
the blocks' interquartile range is kept as the spread. ``clock="wall"`` (the default) times
wall-clock seconds with the usual threads: the throughput a user sees, which other processes on a
shared CPU disturb. ``clock="cpu"`` runs one thread and times its CPU time (``time.thread_time``),
which excludes time spent waiting for a core: single-core throughput, repeatable on a loaded
machine. Inference runs under ``inference_mode``; a training step is forward, a loss on every
feature level, backward and an SGD step. The CSV columns follow timm's ``benchmark.py`` results
(``infer_samples_per_sec``, ``infer_step_time`` in ms, ``infer_gmacs`` per sample, ``param_count``
in millions, ...), with this project's extra columns after them. As timm's ``--reparam``, models
with a deploy form (FastViT, UniRepLKNet, RepLKNet) are reparameterized before inference is timed
and counted (``infer_form`` says which form was measured; ``reparam=False`` times the train form);
training always runs the train form. FLOPs are reported as GMACs (multiply-accumulates, as timm
and the papers count them; ``infer_gflops`` is twice that).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step. On CPU, where PyTorch
keeps no allocator statistics, the peak number of bytes held by tensor storages at once during
one step, tracked with a ``TorchDispatchMode``: weights, buffers, input and optimiser state, plus
every storage an op creates (activations, gradients, temporaries) until it is freed. Allocator
overhead and scratch memory internal to a kernel are not included.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .allocator import add_allocator_option, keep_freed_memory
from .records import atomic_path

if TYPE_CHECKING:
    import pandas as pd

PRECISIONS = ("fp32", "bf16")
CLOCKS = ("wall", "cpu")
TIMM_COLUMNS = ("model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size",
                "infer_gmacs", "param_count", "train_samples_per_sec", "train_step_time", "train_batch_size",
                "train_img_size")
EXTRA_COLUMNS = ("family", "infer_gflops", "infer_spread_pct", "infer_peak_mem_mb", "train_spread_pct",
                 "train_peak_mem_mb", "device", "threads", "clock", "precision", "channels_last", "compiled",
                 "infer_form", "error")
COLUMNS = TIMM_COLUMNS + EXTRA_COLUMNS


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: tuple[int, int] | int = 224, *, batch_size: int = 1,
                device: str | torch.device | None = None) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass at ``input_size``, per batch.

    >>> count_flops(nn.Conv2d(3, 8, 1, bias=False), 4)  # 8 outputs x 16 pixels x 3 MACs x 2
    768
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    x = torch.zeros(batch_size, 3, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class TensorMemoryPeak(TorchDispatchMode):
    """Peak bytes held by tensor storages at once while the mode is active (the CPU peak memory).

    ``resident`` are the bytes already alive when the mode starts (weights, input, optimiser
    state); every storage an op creates is added until Python frees it.
    """

    def __init__(self, resident: int = 0) -> None:
        super().__init__()
        self.current = self.peak = resident
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or storage.nbytes() == 0:
                continue
            self._live.add(key)
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class BenchSettings:
    """How a backbone is measured; every field becomes part of the result row's context."""

    batch_size: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    warmup: int = 3
    blocks: int = 7  # timed blocks; their median is reported
    block_time: float = 0.5  # seconds per block (at least one step)
    train: bool = True
    clock: str = "wall"  # "cpu": one thread, timed by its CPU time (see the module docstring)
    reparam: bool = True  # time inference in the deploy form of models that have one (timm's --reparam)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if self.clock == "cpu" and torch.device(self.device).type != "cpu":
            raise ValueError(f"clock='cpu' times CPU work; device {self.device!r} needs clock='wall'")
        if self.batch_size < 1 or self.warmup < 0 or self.blocks < 3 or self.block_time <= 0:
            raise ValueError(f"batch_size >= 1, warmup >= 0, blocks >= 3 and block_time > 0 are required, got "
                             f"batch_size={self.batch_size}, warmup={self.warmup}, blocks={self.blocks}, "
                             f"block_time={self.block_time}")


def resolve_backbones(names: Sequence[str]) -> list[str]:
    """Expand shell-style patterns (``"*mamba*"``) to registered names; exact names pass through."""
    from backbones import TIMM_PREFIX, backbone_entry, list_backbones

    out: list[str] = []
    for name in names:
        if any(ch in name for ch in "*?["):
            found = list_backbones(name)
            if not found:
                raise ValueError(f"no registered backbone matches {name!r}; see `arena list`")
        else:
            if not name.startswith(TIMM_PREFIX):
                backbone_entry(name)  # raises with close names
            found = [name]
        out += [n for n in found if n not in out]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], Any], device: torch.device, settings: BenchSettings) -> tuple[float, float]:
    """Median seconds per step over ``blocks`` timed blocks, and the blocks' interquartile range over it.

    Each block runs as many steps as fill ``block_time`` (estimated from one step after warm-up),
    with the device synchronised before and after it.
    """
    clock = time.thread_time if settings.clock == "cpu" else time.perf_counter
    for _ in range(settings.warmup):
        step()
    _sync(device)
    t0 = clock()
    step()
    _sync(device)
    per_block = max(1, round(settings.block_time / (clock() - t0)))
    times = []
    for _ in range(settings.blocks):
        _sync(device)
        t0 = clock()
        for _ in range(per_block):
            step()
        _sync(device)
        times.append((clock() - t0) / per_block)
    q25, median, q75 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (q75 - q25) / median


def _peak_memory(step: Callable[[], Any], device: torch.device, resident: int) -> float:
    """Peak memory of one step in MiB (see the module docstring for what CPU counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    with TensorMemoryPeak(resident) as tracker:
        step()
    return tracker.peak / 2**20


@contextmanager
def clock_threads(settings: BenchSettings) -> Iterator[None]:
    """Under ``clock="cpu"`` run with one intra-op thread: ops then run on the calling thread, whose
    CPU time is the clock; the previous thread count comes back afterwards. A no-op otherwise."""
    if settings.clock == "wall":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_backbone(name: str, img_size: int, settings: BenchSettings) -> dict[str, Any]:
    """One result row: params, FLOPs, inference (and training) throughput and peak memory."""
    with clock_threads(settings):
        return _bench_backbone(name, img_size, settings)


def compiled(model: nn.Module) -> Callable[..., Any]:
    """``torch.compile(model)`` for fixed shapes: a benchmark's shapes never change, and a module called at several
    shapes (a stage's blocks) is then compiled once per shape rather than again with symbolic sizes, which
    inductor fails to lower for VMamba's training graph in this PyTorch."""
    return torch.compile(model, dynamic=False)


def _bench_backbone(name: str, img_size: int, settings: BenchSettings) -> dict[str, Any]:
    from backbones import create_backbone

    device = torch.device(settings.device)
    with torch.device("meta"):
        meta = create_backbone(name, img_size=img_size)
    deploy = settings.reparam and hasattr(meta, "reparameterize")
    row: dict[str, Any] = {
        "model": name, "family": meta.family, "infer_img_size": img_size, "infer_batch_size": settings.batch_size,
        "param_count": round(count_params(meta) / 1e6, 3), "device": device.type, "threads": torch.get_num_threads(),
        "clock": settings.clock, "precision": settings.precision, "channels_last": settings.channels_last,
        "compiled": settings.compile, "infer_form": "deploy" if deploy else "train",
    }
    if deploy:  # FLOPs of the form that is timed (tensors the merge creates are on meta too)
        with torch.device("meta"), torch.no_grad():
            meta.eval().reparameterize()
    flops = count_flops(meta, img_size)
    row.update(infer_gmacs=round(flops / 2e9, 4), infer_gflops=round(flops / 1e9, 4))
    del meta

    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = create_backbone(name, img_size=img_size).to(device).to(memory_format=fmt)
    x = torch.randn(settings.batch_size, 3, img_size, img_size, device=device).to(memory_format=fmt)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if settings.precision == "bf16" else nullcontext())
    infer_model = model
    if deploy:  # a reparameterized copy for inference; training keeps the train form
        infer_model = copy.deepcopy(model).eval()
        with torch.no_grad():
            infer_model.reparameterize()
    infer_run = compiled(infer_model) if settings.compile else infer_model
    resident = tensor_bytes([*infer_model.parameters(), *infer_model.buffers(), x])

    def infer() -> None:
        with torch.inference_mode(), autocast:
            infer_run(x)

    infer_model.eval()
    step_s, spread = time_step(infer, device, settings)
    row.update(infer_samples_per_sec=round(settings.batch_size / step_s, 2), infer_step_time=round(step_s * 1e3, 3),
               infer_spread_pct=round(100 * spread, 2), infer_peak_mem_mb=round(_peak_memory(infer, device, resident), 2))
    del infer_run, infer_model
    if settings.train:
        run = compiled(model) if settings.compile else model
        resident = tensor_bytes([*model.parameters(), *model.buffers(), x])
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def train_step() -> None:
            with autocast:
                loss = sum(f.float().mean() for f in run(x))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_s, spread = time_step(train_step, device, settings)
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        peak = _peak_memory(train_step, device, resident + tensor_bytes(state))
        row.update(train_samples_per_sec=round(settings.batch_size / step_s, 2),
                   train_step_time=round(step_s * 1e3, 3), train_batch_size=settings.batch_size,
                   train_img_size=img_size, train_spread_pct=round(100 * spread, 2), train_peak_mem_mb=round(peak, 2))
    return row


def run_bench(names: Sequence[str], img_sizes: Sequence[int], settings: BenchSettings, *,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> pd.DataFrame:
    """Measure every backbone at every resolution; a backbone that fails gets a row with ``error``."""
    import pandas as pd

    rows = []
    for name in resolve_backbones(names):
        for size in img_sizes:
            try:
                row = bench_backbone(name, int(size), settings)
            except Exception as e:  # a size or op the model refuses: say so in its row, measure the rest
                row = {"model": name, "infer_img_size": int(size), "infer_batch_size": settings.batch_size,
                       "device": settings.device, "precision": settings.precision,
                       "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return pd.DataFrame(rows).reindex(columns=list(COLUMNS))


def write_bench_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``run_bench`` rows to ``path`` atomically: an earlier file survives a failed write whole."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def _cmd_bench(args: argparse.Namespace) -> int:
    settings = BenchSettings(batch_size=args.batch_size, device=args.device, precision=args.precision,
                             channels_last=args.channels_last, compile=args.compile, warmup=args.warmup,
                             blocks=args.blocks, block_time=args.block_time, train=not args.no_train,
                             clock=args.clock, reparam=not args.no_reparam)
    kept = not args.glibc_allocator and keep_freed_memory()
    print(f"settings: {asdict(settings)}; freed memory {'kept' if kept else 'returned'} (arena/allocator.py)",
          file=sys.stderr)

    def show(row: dict[str, Any]) -> None:
        if row.get("error"):
            print(f"{row['model']:<24} @{row['infer_img_size']}: {row['error']}", file=sys.stderr)
            return
        train = (f"  train {row['train_samples_per_sec']:9.1f} img/s ±{row['train_spread_pct']:.1f}%"
                 if "train_samples_per_sec" in row else "")
        print(f"{row['model']:<24} @{row['infer_img_size']:<4} {row['param_count']:7.2f} M  "
              f"{row['infer_gmacs']:7.3f} GMACs  infer ({row['infer_form']}) {row['infer_samples_per_sec']:9.1f} img/s "
              f"±{row['infer_spread_pct']:.1f}%  {row['infer_peak_mem_mb']:8.1f} MiB{train}", file=sys.stderr)

    df = run_bench(args.backbones, args.img_size, settings, on_row=show)
    if args.out:
        write_bench_csv(df, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        df.to_csv(sys.stdout, index=False)
    return int(df["error"].notna().all())


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="params, FLOPs, throughput and peak memory; timm-compatible CSV")
    p.add_argument("backbones", nargs="+", help="names or shell-style patterns, e.g. convnext_atto '*mamba*'")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], help="one or more resolutions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 runs under autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="time the torch.compile'd model (warm-up compiles)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--blocks", type=int, default=7, help="timed blocks; the median block is reported")
    p.add_argument("--block-time", type=float, default=0.5, help="seconds per timed block (at least one step)")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--no-reparam", action="store_true",
                   help="time inference in the train form too (default: reparameterizable models in deploy form)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="cpu: one thread timed by its CPU time, steady on a busy machine (single-core throughput)")
    add_allocator_option(p)
    p.add_argument("--out", help="CSV file (default: stdout)")
    p.set_defaults(func=_cmd_bench)
