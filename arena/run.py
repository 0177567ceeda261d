"""The pieces ``train.py`` and ``eval.py`` share: build a run from its config, write its record.

A run is built in a fixed order so that bad input fails before anything is trained or written:
backbone -> datamodule (with the backbone's preprocessing) -> input-size check -> task module
(its head sized from ``feature_info`` and the data's classes) -> trainer.

Checkpoints are data: every checkpoint file is read by ``load_checkpoint`` (``weights_only=True``),
Lightning's own reads included (``SafeCheckpointIO``), and what a checkpoint may change in the
config it is recomposed from is limited to what defines the trained model (``checkpoint_refusal``).
"""
from __future__ import annotations

import logging
import os
import random
import re
import shlex
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from omegaconf import DictConfig, OmegaConf, open_dict

from backbones import Backbone

from .allocator import keep_freed_memory
from .bench import count_flops, count_params
from .config import resolve_data_config
from .data.base import ArenaDataModule
from .records import RECORD_NAME, atomic_path, make_record, write_record
from .scaling import check_launch, resolve_sync_batchnorm, single_test_trainer
from .tasks.base import TaskModule

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
# what a checkpoint may set in the config it is recomposed from: choices of these config groups ...
TRAINED_GROUPS = ("backbone", "task", "data", "experiment", "bob_setting", "weights")
# ... keys under these roots (none of whose parts starts with "_", so no _target_, _partial_, _args_) ...
TRAINED_ROOTS = ("backbone", "task", "data", "seed")
# ... and the trainer keys that change what is computed
TRAINED_TRAINER_KEYS = ("precision", "max_epochs", "max_steps", "min_epochs", "min_steps", "accumulate_grad_batches",
                        "gradient_clip_val", "gradient_clip_algorithm", "limit_train_batches", "deterministic")


@dataclass
class Run:
    cfg: DictConfig
    backbone: Backbone
    datamodule: ArenaDataModule
    module: TaskModule
    trainer: L.Trainer
    run_dir: Path
    started: float = field(default_factory=time.time)


def resolve_num_classes(cfg: DictConfig, datamodule: ArenaDataModule) -> int:
    """The data decides the number of classes; a configured number must agree with it."""
    wanted = cfg.task.get("num_classes")
    if wanted is not None and int(wanted) != datamodule.num_classes:
        raise ValueError(f"task.num_classes={wanted} but data {cfg.data.name!r} has {datamodule.num_classes} "
                         f"classes ({', '.join(datamodule.class_names[:10])}...); drop task.num_classes or fix it")
    return datamodule.num_classes


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_DROP_TIP = _DropTip()
KNOWN_NOISE = (
    r".*LeafSpec.* is deprecated",  # Lightning's own use of a deprecated torch API
    r"Checkpoint directory .* exists and is not empty",  # LastCheckpoint overwrites last.ckpt on purpose
)


def quiet_known_noise() -> None:
    """Drop Lightning's advertising tip and warnings that say nothing about the run (``KNOWN_NOISE``), and send
    the other warnings through logging so they also reach the run's log file."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_TIP)
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.captureWarnings(True)


def build_run(cfg: DictConfig, run_dir: str | Path) -> Run:
    """Instantiate everything a run needs from its composed config."""
    if cfg.trainer.get("use_distributed_sampler", False):
        raise ValueError("trainer.use_distributed_sampler=true would shard the data twice under DDP: the data "
                         "module's loaders shard it themselves (so that a resumed run continues mid-epoch); "
                         "drop the override")
    quiet_known_noise()
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(run_dir)
    backbone: Backbone = instantiate(cfg.backbone)
    data_config = resolve_data_config(backbone, cfg.data.get("image_size"))
    datamodule: ArenaDataModule = instantiate(cfg.data, task=cfg.task.name, data_config=data_config)
    backbone.check_input_size(*datamodule.image_size)
    module: TaskModule = instantiate(cfg.task.module, backbone=backbone,
                                     num_classes=resolve_num_classes(cfg, datamodule))
    module.arena_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(resolve_sync_batchnorm(cfg.trainer), callbacks=callbacks,
                                     logger=loggers or False, plugins=[SafeCheckpointIO()],
                                     use_distributed_sampler=False)
    check_launch(trainer)
    return Run(cfg, backbone, datamodule, module, trainer, run_dir)


def backbone_costs(backbone: Backbone, image_size: tuple[int, int]) -> tuple[int, int | None]:
    """Parameters and forward FLOPs of the backbone alone at the run's resolution."""
    params = count_params(backbone)
    try:
        flops = count_flops(backbone, image_size)
    except Exception as e:  # an op the counter cannot trace must not lose the run's results
        warnings.warn(f"FLOPs of {type(backbone).__name__} could not be counted: {e}")
        flops = None
    return params, flops


def run_test(run: Run) -> None:
    """Test the run's module over the whole test set exactly once (under DDP: on rank 0 alone, see ``arena.scaling``)."""
    trainer = single_test_trainer(run.trainer, run.cfg.trainer)
    if trainer is not None:
        trainer.test(run.module, datamodule=run.datamodule)


def tested_weights(*, trainer: L.Trainer | None = None, checkpoint: dict[str, Any] | None = None) -> str:
    """Which weights a test scored: ``"ema"`` when ``trainer`` averages them (an EMA callback) or ``checkpoint``
    was saved by such a trainer (its ``state_dict`` is then the average), else ``"final"`` (the weights as trained)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    if checkpoint is not None:
        return "ema" if "averaging_state" in checkpoint else "final"
    return "ema" if trainer and any(isinstance(c, EMAWeightAveraging) for c in trainer.callbacks) else "final"


def finish_run(run: Run, *, stage: str, checkpoint: str | None = None,
               weights: str | None = None) -> dict[str, Any] | None:
    """Write the run's record from what ``run_test`` logged; returns the record (``None`` on DDP ranks > 0).

    ``weights`` names the tested weights (``tested_weights``); by default they follow the trainer's callbacks.
    """
    if run.trainer.global_rank != 0:
        return None
    params, flops = backbone_costs(run.backbone, run.datamodule.image_size)
    record = make_record(stage=stage, status="complete", cfg=run.cfg, family=run.backbone.family,
                         metrics=run.module.test_metrics(), params=params, flops=flops,
                         wall_time_s=time.time() - run.started, run_dir=run.run_dir, checkpoint=checkpoint,
                         primary_metric=run.module.primary_metric,
                         tested_weights=weights or tested_weights(trainer=run.trainer))
    write_record(run.run_dir, record)
    log.info("record: %s", run.run_dir / RECORD_NAME)
    log.info("checkpoint: %s", checkpoint or "none")
    log.info("run directory: %s", run.run_dir)
    return record


@contextmanager
def logged_failure(run_dir: str | Path) -> Iterator[None]:
    """A failing run logs its traceback (so the run's log file holds it) and exits with status 1."""
    try:
        yield
    except Exception:
        log.exception("the run failed; its log and outputs are in %s", run_dir)
        raise SystemExit(1) from None


class ParamsSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column, logged so the run's log file holds it.

    Lightning counts FLOPs only through a module's ``example_input_array``, which the task modules
    do not set, and would print 0; the record's ``flops`` is the backbone's measured count.
    """

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        log.info("\n%s", "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of this project, read without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {str(path)!r} safely ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); "
                         f"to load backbone weights use backbone.pretrained=<file>")
    return ckpt



class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file I/O, read safely and written atomically.

    Reads go through ``load_checkpoint`` (``weights_only=True``), so resuming with
    ``trainer.fit(ckpt_path=...)`` cannot run pickled code whatever torch's default is. Writes go
    to a temporary file beside the target, flushed to disk, then ``os.replace``d over it: a kill
    at any moment leaves the previous checkpoint or the new one, never a torn file (Lightning's
    fsspec transaction stages local files in the system temp directory and *moves* them, which
    is a copy when that is another file system).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return load_checkpoint(path)


def _underscored(value: Any) -> str | None:
    """The first dict key in ``value`` (nested) that starts with ``_`` (``_target_``, ``_partial_`` ...)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k).startswith("_"):
                return str(k)
            if (found := _underscored(v)) is not None:
                return found
    if isinstance(value, (list, tuple)):
        return next((found for v in value if (found := _underscored(v)) is not None), None)
    return None


def checkpoint_refusal(override: str) -> str | None:
    """Why a command-line override may not come from a checkpoint, or ``None`` when it defines what was trained.

    Accepted: a choice of a ``TRAINED_GROUPS`` config group by name (a file of the project's ``conf/``,
    or a registered backbone; no ``..`` or absolute path), and setting, adding or deleting a key under ``TRAINED_ROOTS`` or one of
    ``TRAINED_TRAINER_KEYS``, with no key part and no key inside the value starting with ``_``.
    Everything else (callbacks, loggers, ``hydra``, ``paths``, ``ckpt_path``, other trainer keys,
    any ``_target_``, package overrides ``group@pkg=...``, sweeps) is refused.
    """
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except Exception as e:  # hydra's grammar errors have several types
        return f"it is not a valid override ({type(e).__name__})"
    key = parsed.key_or_group
    if parsed.package is not None:
        return f"it places a config at package {parsed.package!r}"
    if parsed.is_sweep_override():
        return "it is a sweep"
    parts = key.replace("/", ".").split(".")
    if bad := next((p for p in parts if p.startswith("_")), None):
        return f"key {key!r} has the part {bad!r}"
    if not parsed.is_delete() and (bad := _underscored(parsed.value())) is not None:
        return f"its value holds the key {bad!r}"
    if len(parts) == 1 and key in TRAINED_GROUPS:
        option = parsed.value()
        if not isinstance(option, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*", option) or ".." in option:
            return f"{option!r} is not the name of a {key} config"
        return None
    if parts[0] in TRAINED_ROOTS:
        return None
    if parts[0] == "trainer" and len(parts) == 2 and parts[1] in TRAINED_TRAINER_KEYS:
        return None
    return f"key {key!r} does not define what was trained"


def trained_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides a checkpoint stores: those that define what was trained (``checkpoint_refusal`` is None)."""
    return [o for o in overrides if checkpoint_refusal(o) is None]


def checked_overrides(ckpt: dict[str, Any], path: str | Path) -> list[str]:
    """A checkpoint's stored ``arena_overrides``, refused whole if any of them sets more than the trained model."""
    stored = ckpt.get("arena_overrides") or []
    if not isinstance(stored, list) or not all(isinstance(o, str) for o in stored):
        raise ValueError(f"checkpoint {str(path)!r}: arena_overrides must be a list of strings, got {stored!r}")
    for o in stored:
        if (why := checkpoint_refusal(o)) is not None:
            raise ValueError(
                f"checkpoint {str(path)!r} is refused: its stored override {o!r} is not allowed ({why}). A checkpoint "
                f"may only choose {', '.join(TRAINED_GROUPS)} configs and set {', '.join(TRAINED_ROOTS)} keys or "
                f"trainer.{{{', '.join(TRAINED_TRAINER_KEYS)}}}, never a _target_, callbacks, loggers, hydra or "
                f"paths; this file was altered or not written by train.py. Give those settings on the command line")
    return stored


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """``ckpt_path`` as a file: ``last`` is ``<run dir>/checkpoints/last.ckpt`` (an error when missing),
    ``auto`` the same when it exists and ``None`` (start fresh) when not; a path must exist."""
    if not ckpt_path:
        return None
    if ckpt_path in ("last", "auto"):
        last = Path(run_dir) / "checkpoints" / LAST_CKPT
        if last.is_file():
            return str(last)
        if ckpt_path == "auto":
            return None
        raise FileNotFoundError(
            f"ckpt_path=last but {str(last)!r} does not exist, so there is nothing to resume in {str(run_dir)!r}; "
            f"pass the interrupted run's directory (hydra.run.dir=<run dir>), or ckpt_path=auto to resume when "
            f"a checkpoint exists and start fresh otherwise")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist; pass an existing checkpoint, "
                                f"ckpt_path=last (<run dir>/checkpoints/{LAST_CKPT}) or ckpt_path=auto")
    return str(ckpt_path)


def checkpoint_overrides(ckpt_path: str | Path, command_line: Sequence[str]) -> list[str]:
    """The overrides that recompose a checkpoint's run: its checked stored ones that the command line does not
    replace (same key or group), then the command line's."""
    stored = checked_overrides(load_checkpoint(ckpt_path), ckpt_path)
    parser = OverridesParser.create()
    here = {o.key_or_group for o in parser.parse_overrides(list(command_line))}
    return [o for o, p in zip(stored, parser.parse_overrides(stored)) if p.key_or_group not in here] + list(command_line)


def with_checkpoint_overrides(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with those of their ``ckpt_path=<file>`` checkpoint put first (``checkpoint_overrides``),
    so that Hydra composes the checkpoint's run: ``eval.py ckpt_path=<detection ckpt> task.module.score_threshold=0.2``
    needs no ``task=detection``. ``ckpt_path=last|auto`` is resolved later, in the run directory."""
    path = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("ckpt_path=")), None)
    if path in (None, "", "null", "last", "auto"):
        return list(argv)
    return checkpoint_overrides(resolve_ckpt_path(path, "."), argv)


def compose_from_checkpoint(config_name: str, ckpt_path: str, command_line: Sequence[str],
                            run_dir: str | Path) -> tuple[DictConfig, list[str]]:
    """The config of a run recomposed from a checkpoint (``checkpoint_overrides``), and those overrides."""
    overrides = checkpoint_overrides(ckpt_path, command_line)
    cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.ckpt_path = ckpt_path
    return cfg, overrides


def _rng_states() -> dict[str, Any]:
    """Every random generator a training step may draw from, as plain tensors and tuples (weights_only-safe)."""
    np_state = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, always resumable: written at the end of every epoch, every
    ``every_n_train_steps`` optimizer steps when set, and when SIGTERM or SIGINT stops the run.

    A signal is acted on between steps (Lightning's SIGTERM path: SIGINT is routed to it too), so
    the saved state is a whole step, the same step on every process under DDP; a second SIGINT
    stops at once without saving. The checkpoint carries the random generators' states (every
    process's), restored when training resumes, and the training loader's position
    (``arena.data.resumable``), so a resumed deterministic run takes the same steps as an
    uninterrupted one. ``stopped_by`` is the signal that stopped the run, if any.
    """

    def __init__(self, *, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be a positive number of steps or null, "
                             f"got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, filename=Path(LAST_CKPT).stem, monitor=None, save_top_k=1,
                         save_last=False, enable_version_counter=False, save_on_train_epoch_end=True,
                         every_n_train_steps=every_n_train_steps)
        self.stopped_by: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / LAST_CKPT

    @property
    def state_key(self) -> str:
        # one per trainer whatever its settings, so a resume restores it after every_n_train_steps changed
        return type(self).__name__

    def _save_last(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_checkpoint(trainer, str(self.path))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now and restores the previous handlers at teardown
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def stop(signum: int, frame: Any) -> None:
            if self.stopped_by == signal.SIGINT and signum == signal.SIGINT and trainer.global_rank == 0:
                raise KeyboardInterrupt  # a second Ctrl+C: stop now (Lightning then ends the other processes)
            if self.stopped_by is None:
                log.warning("received %s: saving %s after this step, then stopping", signal.Signals(signum).name,
                            self.path)
            self.stopped_by = self.stopped_by or signum
            if trainer.world_size == 1 and callable(lightning_sigterm):
                lightning_sigterm(signum, frame)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # Lightning loads the training loader's saved position only when it makes the loader after restoring the
        # loops; ``estimated_stepping_batches`` (the LR schedule) made it before, so load it now, before its first batch
        trainer.fit_loop._load_combined_loader_states()
        saved, self._rng_to_restore = self._rng_to_restore, None
        if isinstance(saved, list) and len(saved) != trainer.world_size:
            log.warning("%s was saved by %d processes and resumes on %d: the random draws of the resumed run "
                        "follow the seed, not those of the interrupted one", self.path, len(saved),
                        trainer.world_size)
        elif saved is not None:
            _set_rng_states(saved[trainer.global_rank] if isinstance(saved, list) else saved)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.world_size > 1:
            self._agree_to_stop(trainer)
        super().on_train_batch_end(trainer, *args)

    def _agree_to_stop(self, trainer: L.Trainer) -> None:
        """Stop every process after this step when any got a signal.

        Processes get signals apart (a terminal's Ctrl-C reaches all, ``kill`` one, Lightning's handler
        passes it on) and at different points of a step, where Lightning's handler would start a
        collective that the others meet inside another one. So a signal is only noted, and the processes
        agree here, at the same point of every step.
        """
        noted = torch.tensor([self.stopped_by or 0], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(noted, op=torch.distributed.ReduceOp.MAX)
        if agreed := int(noted.item()):
            self.stopped_by = self.stopped_by or agreed
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this step, as for SIGTERM

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state and every process's random generator states (each process draws its own)."""
        states = _rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)  # every process saves: checkpoints are collective
            states = gathered
        return {**super().state_dict(), "rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng_states")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "rng_states"})


def resume_command(run_dir: str | Path, overrides: Sequence[str]) -> str:
    """The command that resumes a run of ``overrides``: those a checkpoint does not keep (the hardware,
    loggers, callbacks) are given again."""
    again = [o for o in overrides
             if checkpoint_refusal(o) is not None and not o.startswith(("hydra.", "ckpt_path="))]
    return shlex.join(["python", "train.py", "ckpt_path=last", *again, f"hydra.run.dir={run_dir}"])


def fit(run: Run, ckpt_path: str | None, overrides: Sequence[str] = ()) -> None:
    """``trainer.fit``, resuming from ``ckpt_path``; a run stopped by a signal exits with 128 + its number and
    logs the command that resumes it (``overrides``: the run's command line)."""
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        checked_overrides(ckpt, ckpt_path)
        log.info("resuming from %s at global step %d (epoch %d)", ckpt_path, ckpt.get("global_step", 0),
                 ckpt.get("epoch", 0))
        del ckpt
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        last = next((cb for cb in run.trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
        signum = (last.stopped_by if last else None) or signal.SIGTERM
        saved = f"saved {last.path}" if last and last.path.is_file() else "no checkpoint was saved"
        log.error("stopped by %s at global step %d; %s. Resume with: %s", signal.Signals(signum).name,
                  run.trainer.global_step, saved, resume_command(run.run_dir, overrides))
        raise SystemExit(128 + signum) from None
