"""What the classifier and the distiller share: optimizer/scheduler wiring, train-step
logging and checks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from kd_lightning.errors import ConfigError
from kd_lightning.lightning_compat import epoch_is_over


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
        # Σ batch·value of the train loss and its terms, logged as epoch means
        self._epoch_sums: Tensor | None = None
        self._epoch_names: list[str] = []
        self._epoch_count = 0
        #: subclasses set it when a step updated ``self.train_metrics``
        self._train_metrics_updated = False
        #: stages ("val", "test") whose metrics a step updated since their last epoch end
        self._eval_updated: set[str] = set()

    # -- train-step logging ------------------------------------------------------------
    # Every ``self.log`` call costs ~1.5 ms of Python on the step's critical path (Lightning
    # re-walks the logged value's state each call), as much as a small model's backward.
    # So a training step accumulates its scalars on the device, the epoch means are logged
    # once per epoch, and the step loss only on the steps where Lightning shows it.
    def log_train_step(self, loss: Tensor, batch_size: int, batch_idx: int,
                       terms: dict[str, Tensor] | None = None) -> None:
        """Logs ``train/loss_step`` when a logger or progress bar will show it, and adds
        ``loss`` and ``terms`` (name → scalar) to the epoch means ``train/loss_epoch``
        (``train/loss`` for callbacks) and ``train/loss_<name>``."""
        if self._step_value_shown(batch_idx):
            self.log("train/loss_step", loss, prog_bar=True, batch_size=batch_size)
        terms = terms or {}
        values = torch.stack([loss.detach(), *(t.detach() for t in terms.values())]) * batch_size
        self._epoch_sums = values if self._epoch_sums is None else self._epoch_sums + values
        self._epoch_names = ["", *terms]
        self._epoch_count += batch_size

    def _step_value_shown(self, batch_idx: int) -> bool:
        """Whether Lightning will emit a value logged in this training step: to loggers
        every ``log_every_n_steps`` optimizer steps, to a progress bar at its refresh rate."""
        trainer = self._trainer
        if trainer is None:
            return False
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        if trainer.loggers and every > 0 and (self.global_step + 1) % every == 0:
            return True
        bar = trainer.progress_bar_callback
        if bar is None or not bar.is_enabled:
            return False
        rate, n = getattr(bar, "refresh_rate", 1), batch_idx + 1
        return rate > 0 and (n % rate == 0 or n == trainer.num_training_batches)

    def on_train_epoch_end(self) -> None:
        if self._epoch_sums is not None:
            means = self._epoch_sums / self._epoch_count
            for name, value in zip(self._epoch_names, means):
                if name:
                    self.log(f"train/loss_{name}", value, sync_dist=True)
                else:  # the total: the usual Lightning names for loggers and for callbacks
                    self.log("train/loss_epoch", value, prog_bar=True, sync_dist=True)
                    self.log("train/loss", value, logger=False, sync_dist=True)
        if self._train_metrics_updated:
            self.log_dict(self.train_metrics.compute(), sync_dist=True)
        if hasattr(self, "train_metrics"):
            self.train_metrics.reset()
        self._epoch_sums, self._epoch_count, self._train_metrics_updated = None, 0, False

    # -- the interrupted epoch's running means survive a resume ----------------------------
    # A mid-epoch checkpoint (every_n_train_steps, SIGTERM) stores the epoch's sums and
    # train-metric states so far; the resumed run continues them, and the epoch's logged
    # train/* means equal an uninterrupted run's. Single process only: under DDP the
    # checkpoint holds rank 0's part alone, so the interrupted epoch's train/* means then
    # cover the batches after the resume (validation is unaffected).
    _pending_epoch_state: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is None or self._epoch_sums is None or trainer.world_size > 1:
            return
        if epoch_is_over(trainer):
            return  # the next epoch starts afresh
        metrics = getattr(self, "train_metrics", None)
        checkpoint["kd_train_epoch"] = {
            "epoch": self.current_epoch,
            "sums": self._epoch_sums.detach().cpu(), "names": self._epoch_names, "count": self._epoch_count,
            "metrics": {
                name: {k: _to(v, "cpu") for k, v in metric.metric_state.items()}
                for name, metric in (metrics.items() if self._train_metrics_updated else ())
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_epoch_state = checkpoint.get("kd_train_epoch")

    def on_train_start(self) -> None:
        from kd_lightning.callbacks.mode_check import check_train_modes

        # after Lightning's own mode handling: trainable parts train, teachers stay frozen
        check_train_modes(self)
        # (not on_train_epoch_start: Lightning skips that hook for an epoch resumed midway)
        state, self._pending_epoch_state = self._pending_epoch_state, None
        # only when this fit resumes that checkpoint (not for weights loaded with
        # load_from_checkpoint and then trained afresh)
        resuming = self.trainer.ckpt_path is not None
        if state is None or not resuming or state["epoch"] != self.current_epoch or self.trainer.world_size > 1:
            return
        self._epoch_sums = state["sums"].to(self.device)
        self._epoch_names, self._epoch_count = state["names"], state["count"]
        metrics = dict(self.train_metrics.items()) if state["metrics"] else {}
        for name, saved in state["metrics"].items():
            for key, value in saved.items():
                setattr(metrics[name], key, _to(value, self.device))
        self._train_metrics_updated = bool(state["metrics"])

    # -- eval logging --------------------------------------------------------------------
    # Evaluation steps only update metric objects; their values are computed (and synced
    # over DDP ranks by torchmetrics) and logged once per epoch, for the cost reason above:
    # ~8 self.log calls per val batch would cost more than a GPU forward of that batch.
    def log_eval_epoch(self, stage: str, metrics: nn.ModuleDict, prog_bar: tuple[str, ...] = ()) -> None:
        """Logs and resets ``metrics``: a MetricCollection under its own keys, any other
        Metric as ``<stage>/<key>``; the entries named in ``prog_bar`` also go to the bar
        during validation."""
        if stage not in self._eval_updated:
            return
        self._eval_updated.discard(stage)
        for key, metric in metrics.items():
            values = metric.compute() if isinstance(metric, MetricCollection) else {f"{stage}/{key}": metric.compute()}
            # compute() already synced the ranks; sync_dist only states that (no DDP warning)
            self.log_dict(values, prog_bar=stage == "val" and key in prog_bar, sync_dist=True)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_eval_epoch("val", self.val_metrics, self.prog_bar_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_eval_epoch("test", self.test_metrics)

    #: entries of ``val_metrics`` shown on the progress bar
    prog_bar_metrics: tuple[str, ...] = ()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model", type(self).__name__, "it has no trainable parameters")
        # a submodule (e.g. FactorTransfer's paraphraser) may ask for its own lr: a param group
        groups = [g for m in self.modules() if m is not self and hasattr(m, "optimizer_groups")
                  for g in m.optimizer_groups()]
        if groups:
            own = {id(p) for g in groups for p in g["params"]}
            params = [{"params": [p for p in params if id(p) not in own]}, *groups]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def _to(value: Tensor | list[Tensor], device: torch.device | str) -> Tensor | list[Tensor]:
    """A metric state (a tensor, or a list of them) on ``device``."""
    return [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
