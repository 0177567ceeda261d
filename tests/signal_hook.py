"""A callback that holds a training run at a chosen step until a stop signal arrives, so a test can
interrupt a subprocess at an exact step: ``+callbacks.hold._target_=tests.signal_hook.HoldAtStep``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L


class HoldAtStep(L.Callback):
    """At global step ``step`` write ``flag`` and wait (at most ``timeout`` s) until the run's ``LastCheckpoint``
    noted SIGTERM/SIGINT. Under DDP rank 0 holds; the others wait for it where the processes agree to stop."""

    def __init__(self, *, step: int, flag: str, timeout: float = 300.0) -> None:
        self.step, self.flag, self.timeout = step, Path(flag), timeout

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        from arena.run import LastCheckpoint

        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
        self.flag.write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while last.stopped_by is None and time.monotonic() < deadline:
            time.sleep(0.02)
