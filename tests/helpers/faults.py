"""Test-only callbacks that inject faults into a fit, referenced by class_path from the CLI."""

from __future__ import annotations

import os
import signal as signals
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Send this process ``signal`` once ``trainer.global_step`` reaches ``step``: at the end
    of that training batch, or (``during: validation``) after the first batch of the
    validation that follows it. This is what a scheduler's SIGTERM or the OOM killer's
    SIGKILL does to a run."""

    def __init__(
        self, step: int, signal: str = "SIGTERM", during: Literal["train", "validation"] = "train"
    ) -> None:
        self.step = step
        self.signal = signals.Signals[signal]
        self.during = during
        self.sent = False

    def _send(self, trainer: L.Trainer) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.during == "train":
            self._send(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if self.during == "validation" and not trainer.sanity_checking:
            self._send(trainer)
