"""A callback that holds a training run at a chosen step until a stop signal arrives, so a test can
interrupt a subprocess at an exact step: ``+callbacks.hold._target_=tests.signal_hook.HoldAtStep``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L


class HoldAtStep(L.Callback):
    """At global step ``step`` write ``flag`` and wait (at most ``timeout`` s) until the trainer saw SIGTERM/SIGINT."""

    def __init__(self, *, step: int, flag: str, timeout: float = 300.0) -> None:
        self.step, self.flag, self.timeout = step, Path(flag), timeout

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        self.flag.write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)
