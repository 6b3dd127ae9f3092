"""Weight schedules: a factor in [0, 1] applied to a head's weight over training."""

from __future__ import annotations

from kd_lightning.errors import ConfigError


class Schedule:
    def __call__(self, epoch: int, step: int) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def __call__(self, epoch: int, step: int) -> float:
        return 1.0


class LinearWarmup(Schedule):
    """Ramp linearly from 1/epochs to 1 over the first ``epochs`` epochs, as DKD does
    (mdistiller: ``min(epoch / warmup, 1)`` with 1-based epochs)."""

    def __init__(self, epochs: int = 20) -> None:
        if epochs <= 0:
            raise ConfigError("LinearWarmup.epochs", epochs, "use a number of epochs >= 1")
        self.epochs = epochs

    def __call__(self, epoch: int, step: int) -> float:
        return min((epoch + 1) / self.epochs, 1.0)


class StepWarmup(Schedule):
    """Ramp linearly over the first ``steps`` optimizer steps."""

    def __init__(self, steps: int = 1000) -> None:
        if steps <= 0:
            raise ConfigError("StepWarmup.steps", steps, "use a number of steps >= 1")
        self.steps = steps

    def __call__(self, epoch: int, step: int) -> float:
        return min((step + 1) / self.steps, 1.0)


class EpochWindow(Schedule):
    """1 for epochs in ``[start, stop)``, else 0 (0-based epochs).

    For RepDistiller's two-stage methods: AB and FSP train the student on their loss alone
    for the first 30 epochs (``stop: 30`` on the head, ``start: 30`` on CrossEntropy), then
    on cross-entropy alone."""

    def __init__(self, start: int = 0, stop: int | None = None) -> None:
        if start < 0:
            raise ConfigError("EpochWindow.start", start, "use a first epoch >= 0")
        if stop is not None and stop <= start:
            raise ConfigError("EpochWindow.stop", stop, f"use a stop epoch > start ({start}), or none")
        self.start, self.stop = start, stop

    def __call__(self, epoch: int, step: int) -> float:
        return float(epoch >= self.start and (self.stop is None or epoch < self.stop))
