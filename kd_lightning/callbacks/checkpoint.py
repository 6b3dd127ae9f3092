"""ModelCheckpoint that asks the LightningModule which metric to rank epochs by."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class KDModelCheckpoint(ModelCheckpoint):
    """``monitor: auto`` (the default) uses the module's ``monitor`` attribute —
    ``val/acc`` for a ClassifierModule, ``val/student_acc`` for a DistillationModule —
    so one trainer config serves both. Keeps ``last.ckpt`` for resuming.
    """

    def __init__(
        self,
        monitor: str | None = "auto",
        mode: str = "max",
        save_top_k: int = 1,
        save_last: bool = True,
        filename: str | None = "best-{epoch:03d}",
        **kwargs,
    ) -> None:
        self._auto_monitor = monitor == "auto"
        super().__init__(
            monitor=None if self._auto_monitor else monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=save_last,
            filename=filename,
            auto_insert_metric_name=False,
            **kwargs,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._auto_monitor:
            self.monitor = getattr(pl_module, "monitor", None)
        super().setup(trainer, pl_module, stage)
