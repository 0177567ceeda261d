"""Runs survive interruption and checkpoints are data: kill a run at a chosen step and resume it to the
same result; refuse checkpoints whose stored overrides reach beyond the trained model."""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arena.records import RECORD_NAME
from arena.run import (SafeCheckpointIO, checkpoint_refusal, compose_from_checkpoint, load_checkpoint,
                       resolve_ckpt_path, with_checkpoint_overrides)
from eval import evaluate
from train import train

ROOT = Path(__file__).resolve().parents[1]
# 4 steps an epoch, 3 epochs; deterministic so that a resumed run can be compared number for number. Loader
# workers draw the fresh scenes and flips, the head's dropout draws in the main process, and the resumed run
# crosses an epoch end (validation, a new shuffle) before the last epoch.
RUN = ["backbone=convnext_test", "data.num_train=32", "data.num_val=8", "data.num_test=8", "data.batch_size=8",
       "data.image_size=32", "data.num_workers=2", "task.module.dropout=0.2", "trainer.max_epochs=3",
       "trainer.deterministic=true"]
STEPS, STOP_AT, EVERY = 12, 6, 5  # interrupted in epoch 1; the step checkpoint before it is step 5
EXIT = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT, signal.SIGKILL: -signal.SIGKILL}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run of ``RUN`` (the module's one in-process training): its record."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    out = tmp_path_factory.mktemp("reference")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*RUN, "trainer.enable_progress_bar=false"],
                      return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        record = train(cfg, out, overrides=RUN)
    GlobalHydra.instance().clear()
    return record


def _train_py(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _wait_until_held(proc: subprocess.Popen, flag: Path) -> None:
    """Wait (at most 300 s) until ``HoldAtStep`` wrote ``flag``: the run is held at its step."""
    deadline = time.monotonic() + 300
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), proc.communicate()[0][-3000:]


def _interrupt_and_resume(run_dir: Path, args: list[str], sig: signal.Signals, resume: list[str], *,
                          group: bool = False) -> dict:
    """``train.py *args`` held at step ``STOP_AT`` and stopped by ``sig`` (to its whole process group, as a
    terminal sends Ctrl-C, with ``group``), then ``train.py ckpt_path=last *resume``: the resumed run's record."""
    flag = run_dir.parent / "held"
    proc = _train_py(*args, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
                     f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
                     "+callbacks.hold._target_=tests.signal_hook.HoldAtStep", f"+callbacks.hold.step={STOP_AT}",
                     f"+callbacks.hold.flag={flag}", start_new_session=group)
    _wait_until_held(proc, flag)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT[sig], out[-3000:]
    saved = STOP_AT if sig != signal.SIGKILL else EVERY  # SIGKILL leaves the last step checkpoint
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == saved
    assert not (run_dir / RECORD_NAME).exists()
    if sig != signal.SIGKILL:  # the command printed names again what the checkpoint does not keep
        hint = next(line for line in out.splitlines() if "Resume with: " in line).split("Resume with: ")[1]
        assert hint.startswith("python train.py ckpt_path=last") and hint.endswith(f"hydra.run.dir={run_dir}")
        assert set(resume) <= set(hint.split())

    resumed = _train_py("ckpt_path=last", *resume, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"at global step {saved} " in out
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    log = (run_dir / "train.log").read_text()
    assert f"at global step {saved} " in log and "run directory:" in log
    return json.loads((run_dir / RECORD_NAME).read_text())


# SIGINT's save and resume run by default in test_ctrl_c_in_a_terminal_with_loader_workers; its
# same-result case here under -m slow (each case ~19 s on 2 cores: two train.py processes)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL],
                         ids=lambda s: s.name)
def test_interrupted_run_resumes_to_the_same_result(reference: dict, tmp_path: Path, sig: signal.Signals) -> None:
    record = _interrupt_and_resume(tmp_path / "run", RUN, sig, resume=[])
    assert record["config_hash"] == reference["config_hash"]
    assert record["metrics"] == reference["metrics"]  # bit for bit: same batches, same order, same random draws


# two gloo processes; no loader workers, so each process's main generators draw the samples' scenes and flips
HARDWARE = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]  # a checkpoint keeps the precision
DDP_RUN = [*RUN, "data.batch_size=4", "data.num_workers=0", "+data.fresh_train=false", *HARDWARE,
           "trainer.precision=32-true"]  # 4 steps an epoch


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> dict:
    """An uninterrupted run of ``DDP_RUN``: its record."""
    run_dir = tmp_path_factory.mktemp("ddp") / "reference"
    proc = _train_py(*DDP_RUN, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return json.loads((run_dir / RECORD_NAME).read_text())


# Ctrl-C reaches every process (before the processes agreed on when to stop, rank 1 also got rank 0's copy
# of it, took it for a second Ctrl-C and died); SIGTERM reaches rank 0 alone, under -m slow (~25 s each)
@pytest.mark.parametrize(("sig", "group"), [(signal.SIGINT, True),
                                            pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow)],
                         ids=["ctrl_c_to_all", "sigterm_to_rank_0"])
def test_interrupted_ddp_run_resumes_to_the_same_result(ddp_reference: dict, tmp_path: Path, sig: signal.Signals,
                                                        group: bool) -> None:
    """Each process trains on its shard of one order and draws its own samples; the processes stop after the
    same step, and the run resumed on two processes (a checkpoint does not choose the hardware: the command
    names it again) ends where the uninterrupted one does."""
    record = _interrupt_and_resume(tmp_path / "run", DDP_RUN, sig, resume=HARDWARE, group=group)
    assert record["config_hash"] == ddp_reference["config_hash"]
    assert record["metrics"] == ddp_reference["metrics"]


def test_ctrl_c_in_a_terminal_with_loader_workers(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole process group, loader workers included. Sent at the epoch's
    last step (6 of 48 images / 8), validation still reads batches from its persistent workers before the
    run stops: it saves the step, exits 130 and resumes from there."""
    from tests.test_train import _write_imagefolder

    root = _write_imagefolder(tmp_path / "images", per_class=16)
    run_dir, flag = tmp_path / "run", tmp_path / "held"
    args = ["backbone=convnext_test", "data=imagefolder", f"data.root={root}", "data.image_size=32",
            "data.batch_size=8", "data.num_workers=2", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false"]
    proc = _train_py(*args, "+callbacks.hold._target_=tests.signal_hook.HoldAtStep", "+callbacks.hold.step=6",
                     f"+callbacks.hold.flag={flag}", start_new_session=True)
    _wait_until_held(proc, flag)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "exited unexpectedly" not in out
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    resumed = _train_py(*args, "ckpt_path=last")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "at global step 6 " in out, out[-3000:]


def test_loader_workers_ignore_ctrl_c_and_keep_lightnings_seeding(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import numpy as np

    from arena.data.base import _init_worker

    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    handler, py_state, np_state, torch_state = (signal.getsignal(signal.SIGINT), random.getstate(),
                                                np.random.get_state(), torch.get_rng_state())
    try:
        draws = []
        for worker in (0, 0, 1):
            torch.manual_seed(1234 + worker)  # what the loader gives worker ``worker`` of base seed 1234
            _init_worker(worker, rank=0)
            draws.append((random.random(), float(np.random.rand())))
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)
        random.setstate(py_state), np.random.set_state(np_state), torch.set_rng_state(torch_state)
    assert draws[0] == draws[1] and draws[0] != draws[2]  # Python and NumPy seeded per worker, reproducibly


def test_ckpt_path_last_and_auto(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last.ckpt' does not exist.*ckpt_path=auto"):
        resolve_ckpt_path("last", tmp_path)
    assert resolve_ckpt_path("auto", tmp_path) is None and resolve_ckpt_path(None, tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == resolve_ckpt_path("last", tmp_path) == str(
        tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt' does not exist"):
        resolve_ckpt_path("nope.ckpt", tmp_path)


@pytest.mark.parametrize("override", [
    "+callbacks.evil._target_=builtins.open", "callbacks=none", "logger=wandb", "task.module._target_=builtins.print",
    "task.module.loss={_target_:builtins.open,file:x}", "task@callbacks.evil=detection", "hydra.run.dir=/tmp/x",
    "paths.log_dir=/", "trainer.accelerator=gpu", "+trainer.plugins._target_=x.y", "ckpt_path=last",
    "data=shapes,voc", "optimized_metric=x", "backbone._partial_=true", "task=../../../tmp/evil", "data=/tmp/evil",
])
def test_checkpoint_may_not_set(override: str) -> None:
    assert checkpoint_refusal(override) is not None


@pytest.mark.parametrize("override", [
    "task=detection", "backbone=convnext_test", "backbone=timm/resnet18", "experiment=battle", "data.batch_size=4",
    "+task.module.score_threshold=0.2", "~data.num_val", "seed=3", "trainer.max_epochs=2", "trainer.precision=bf16-mixed",
])
def test_checkpoint_may_set(override: str) -> None:
    assert checkpoint_refusal(override) is None


class _TouchOnLoad:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.mark.parametrize("attack", ["open", "torch_load"])
def test_checkpoint_adding_a_callback_is_refused(reference: dict, make_cfg, tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "marker"
    if attack == "open":  # would create the marker file
        evil = ["+callbacks.evil._target_=builtins.open", f"+callbacks.evil.file={marker}", "+callbacks.evil.mode=w"]
    else:  # would unpickle a file whose loading creates the marker
        payload = tmp_path / "payload.pt"
        payload.write_bytes(pickle.dumps(_TouchOnLoad(marker)))
        evil = ["+callbacks.evil._target_=torch.load", f"+callbacks.evil.f={payload}",
                "+callbacks.evil.weights_only=false"]
    ckpt = load_checkpoint(reference["checkpoint"])
    ckpt["arena_overrides"] = [*ckpt["arena_overrides"], *evil]
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match=r"stored override '\+callbacks.evil._target_=.*' is not allowed"):
        evaluate(make_cfg(f"ckpt_path={bad}", config="eval", run_dir=tmp_path / "eval"), str(tmp_path / "eval"))
    with pytest.raises(ValueError, match=r"callbacks.evil._target_"):
        train(make_cfg(*RUN, f"ckpt_path={bad}", run_dir=tmp_path / "train"), tmp_path / "train")
    if attack == "open":  # once from the command line: resuming it
        (tmp_path / "cli" / "checkpoints").mkdir(parents=True)
        bad.rename(tmp_path / "cli" / "checkpoints" / "last.ckpt")
        cli = _train_py("ckpt_path=last", f"hydra.run.dir={tmp_path / 'cli'}")
        out = cli.communicate(timeout=300)[0]
        assert cli.returncode == 1 and "is not allowed" in out
        log = (tmp_path / "cli" / "train.log").read_text()
        assert "Traceback" in log and "is not allowed" in log  # the run's log file holds the failure
    assert not marker.exists()
    assert not (tmp_path / "eval" / RECORD_NAME).exists() and not (tmp_path / "train" / RECORD_NAME).exists()


def test_eval_takes_task_overrides_on_a_checkpoints_task(make_cfg, tmp_path: Path) -> None:
    tiny = ["backbone=convnext_test", "task=detection", "task.module.fpn_channels=64", "data.batch_size=2",
            "data.num_train=4", "data.num_val=2", "data.num_test=2", "data.image_size=64", "trainer.max_epochs=1"]
    rec = train(make_cfg(*tiny, run_dir=tmp_path / "run"), tmp_path / "run", overrides=tiny)
    here = [f"ckpt_path={rec['checkpoint']}", "task.module.score_threshold=0.2"]
    cfg, overrides = compose_from_checkpoint("eval", rec["checkpoint"], here, tmp_path / "eval")
    assert cfg.task.name == "detection" and cfg.task.module.score_threshold == 0.2 and cfg.data.num_test == 2
    assert overrides[-2:] == here
    argv = with_checkpoint_overrides(here)  # what eval.py hands Hydra
    assert "task=detection" in argv and argv[-2:] == here
    erec = evaluate(make_cfg(*argv, config="eval", run_dir=tmp_path / "eval"), str(tmp_path / "eval"))
    assert erec["task"] == "detection" and erec["stage"] == "eval"
    assert erec["metrics"]["map"] == pytest.approx(rec["metrics"]["map"], abs=1e-6)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    io, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)

    def torn(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {}, "global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_resumable_loader_continues_mid_epoch() -> None:
    from arena.data.resumable import ResumableLoader

    torch.manual_seed(0)
    first = ResumableLoader(list(range(20)), batch_size=4, drop_last=True)
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    rest = list(it)
    torch.manual_seed(123)  # a resumed process: other global random state, the loader's own comes from the state
    second = ResumableLoader(list(range(20)), batch_size=4, drop_last=True)
    second.load_state_dict(state)
    second.sampler.set_epoch(1)
    assert [b.tolist() for b in second] == [b.tolist() for b in rest]
    assert sorted(torch.cat(seen + rest).tolist()) == list(range(20))
    second.sampler.set_epoch(2)
    assert [b.tolist() for b in second] != [b.tolist() for b in seen + rest]  # a new epoch, a new order


class _Augmented(torch.utils.data.Dataset):
    """Items that draw from torch's, NumPy's and Python's generators, as augmentations do."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index, torch.rand(()).item(), np.random.rand(), random.random()], dtype=torch.float64)


def _epochs(loader, *epochs: int) -> list[torch.Tensor]:
    batches = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        batches += list(loader)
    return batches


def test_resumable_loader_with_workers_redraws_the_same_augmentations() -> None:
    """A worker's generators advance with every sample it loads; an epoch resumed midway by a new set of
    workers (here of another size) must still give every sample the draws it had in the uninterrupted run."""
    from arena.data.resumable import ResumableLoader

    torch.manual_seed(0)
    first = ResumableLoader(_Augmented(), batch_size=4, num_workers=2, persistent_workers=True)
    _epochs(first, 0)  # the workers' generators have moved on
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    state = first.state_dict()
    rest = list(it)
    torch.manual_seed(123)
    second = ResumableLoader(_Augmented(), batch_size=4, num_workers=1)
    second.load_state_dict(state)
    resumed = _epochs(second, 1)
    assert len(resumed) == len(rest) == 3
    for got, want in zip(resumed, rest):
        assert torch.equal(got, want)
    epoch_1 = torch.cat(seen + rest)
    assert sorted(epoch_1[:, 0].tolist()) == list(range(24))
    draws = epoch_1[:, 1:]
    assert len(set(draws.flatten().tolist())) == draws.numel()  # every sample and generator draws anew
    # the epoch seeds the draws: a sample's epoch-2 draws differ from its epoch-1 ones
    epoch_2 = torch.cat(_epochs(second, 2))
    assert not torch.equal(epoch_2[epoch_2[:, 0].argsort(), 1:], epoch_1[epoch_1[:, 0].argsort(), 1:])


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_epoch_sampler_shards_one_order(processes: int) -> None:
    """As torch's DistributedSampler: one order padded with its head to a multiple of the processes, dealt out."""
    from arena.data.resumable import EpochSampler

    shards = [EpochSampler(10, seed=7, num_replicas=processes, rank=r) for r in range(processes)]
    for s in shards:
        s.set_epoch(3)
    dealt = [list(s) for s in shards]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(7 + 3)).tolist()
    padded = (order + order)[:len(dealt[0]) * processes]
    assert [len(d) for d in dealt] == [len(s) for s in shards] == [-(-10 // processes)] * processes
    assert [i for batch in zip(*dealt) for i in batch] == padded
    with pytest.raises(ValueError, match="rank must be in"):
        EpochSampler(10, seed=7, num_replicas=2, rank=2)


def _ranks(processes: int, dataset=tuple(range(20)), **kwargs) -> list:
    """The training loaders of ``processes`` DDP processes (batches of 2 by default) over ``dataset``."""
    from arena.data.resumable import ResumableLoader

    kwargs = {"batch_size": 2, "drop_last": True, **kwargs}
    return [ResumableLoader(dataset, seed=5, num_replicas=processes, rank=r, **kwargs) for r in range(processes)]


def test_resumable_loader_resumes_a_ddp_epoch_on_as_many_or_other_processes() -> None:
    """Two processes stopped after two batches each have trained on the first 8 samples of the epoch's order;
    resumed on two they serve the batches they had left, on three the 12 other samples (padded with the head)."""
    first = _ranks(2)
    iters = [iter(loader) for loader in first]
    seen = [torch.cat([next(it), next(it)]).tolist() for it in iters]
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1] and states[0]["done"] == 8 and not states[0]["finished"]
    rest = [[b.tolist() for b in it] for it in iters]

    again = _ranks(2)
    for loader in again:
        loader.load_state_dict(states[0])
    assert [[b.tolist() for b in loader] for loader in again] == rest
    assert again[0].state_dict()["finished"]

    three = _ranks(3)
    for loader in three:
        loader.load_state_dict(states[0])
    left = [i for loader in three for b in loader for i in b.tolist()]
    assert len(left) == 12 and set(left) == set(range(20)) - set(seen[0] + seen[1])


def test_resumable_loader_reads_a_one_process_state_of_earlier_versions() -> None:
    loader = _ranks(1)[0]
    loader.load_state_dict({"seed": 5, "epoch": 0, "served": 3})  # 3 batches of 2 served
    assert len(list(loader)) == 7
    loader.load_state_dict({"seed": 5, "epoch": 0, "served": 10})  # the epoch was over
    assert loader.sampler.epoch == 1 and loader.sampler.start == 0


def test_ddp_samples_draw_by_index_and_leave_the_main_generators() -> None:
    """Under DDP every process's generators are seeded alike: without per-sample seeds both would draw the same
    scenes and flips. In the main process (no workers) the training's own draws go on as if nothing drew."""
    torch.manual_seed(0)
    ranks = _ranks(2, _Augmented(), batch_size=4)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    draws = [torch.cat(list(loader)) for loader in ranks]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[2]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert set(draws[0][:, 1].tolist()).isdisjoint(draws[1][:, 1].tolist())
    # a sample's draws are a function of (seed, epoch, index): the same with loader workers on one process
    with_workers = torch.cat(list(_ranks(1, _Augmented(), batch_size=4, num_workers=1)[0]))
    by_index = {int(row[0]): row[1:] for row in with_workers}
    for row in torch.cat(draws):
        assert torch.equal(row[1:], by_index[int(row[0])])


def test_trainer_may_not_shard_the_data_again(make_cfg) -> None:
    from arena.run import build_run

    with pytest.raises(ValueError, match="use_distributed_sampler=true would shard the data twice"):
        build_run(make_cfg("backbone=convnext_test", "+trainer.use_distributed_sampler=true"), "unused")


def test_resume_command_names_again_what_a_checkpoint_does_not_keep() -> None:
    from arena.run import resume_command

    overrides = ["backbone=convnext_test", "trainer=ddp", "trainer.devices=2", "trainer.precision=32-true",
                 "logger=wandb", "hydra.run.dir=old", "ckpt_path=x.ckpt", "+callbacks.x.note=a b"]
    assert resume_command("runs/r 1", overrides) == ("python train.py ckpt_path=last trainer=ddp trainer.devices=2 "
                                                     "logger=wandb '+callbacks.x.note=a b' 'hydra.run.dir=runs/r 1'")
