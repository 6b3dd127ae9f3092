"""What the classifier and the distiller share: optimizer/scheduler wiring and checks."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from kd_lightning.errors import ConfigError


class BaseModule(L.LightningModule):
    """Args common to both modules.

    Args:
        optimizer: an optimizer class path + init args (default Adam, lr 1e-3).
        lr_scheduler: optional LR scheduler class path + init args, stepped per epoch
            (``ReduceLROnPlateau`` watches ``monitor``).
    """

    #: the metric that checkpointing and the experiment runner rank epochs by
    monitor: str = "val/acc"

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model", type(self).__name__, "it has no trainable parameters")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def check_input_shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ConfigError("model.input_shape", input_shape, "use (channels, height, width), e.g. [3, 32, 32]")
    return shape
