"""ModelCheckpoint that asks the LightningModule which metric to rank epochs by."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.errors import ConfigError
from kd_lightning.lightning_compat import save_last_checkpoint
from kd_lightning.preflight import ensure_writable


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each local checkpoint to a temporary file *in the same directory*, fsync it,
    then rename it over the target: a kill or a full disk mid-save leaves the previous file
    whole. (Lightning's own save stages the file in the system temp dir, and moving it onto
    another filesystem — a cluster's shared checkpoint storage — is a non-atomic copy.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote: fsspec's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


class KDModelCheckpoint(ModelCheckpoint):
    """``monitor: auto`` (the default) uses the module's ``monitor`` attribute —
    ``val/acc`` for both modules (the trained network's accuracy), or none when the data has
    no validation split (``val_fraction: 0``: the kept checkpoint is then the latest epoch).
    Keeps ``last.ckpt`` for resuming
    (``every_n_train_steps: N`` also refreshes it every N steps, for SIGKILL-safe resume).

    Args:
        existing: what a fresh ``fit`` (no ``ckpt_path``) does when ``dirpath`` already
            holds ``.ckpt`` files of an earlier run: ``archive`` (default) moves them to
            ``dirpath/previous/<time>/`` with a warning, so nothing saved is lost and this
            run's files keep their plain names; ``error`` refuses to start; ``overwrite``
            is Lightning's behaviour (same-named files are replaced unless
            ``enable_version_counter``). A resumed fit always keeps the files.
    """

    def __init__(
        self,
        monitor: str | None = "auto",
        mode: str = "max",
        save_top_k: int = 1,
        save_last: bool = True,
        filename: str | None = "best-{epoch:03d}",
        existing: Literal["archive", "error", "overwrite"] = "archive",
        **kwargs,
    ) -> None:
        if existing not in ("archive", "error", "overwrite"):
            raise ConfigError("checkpoint.existing", existing, "use archive, error or overwrite")
        self.existing = existing
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
            if getattr(trainer.datamodule, "val_fraction", None) == 0:
                # no validation split (the published full-train protocol): nothing to rank
                # epochs by, so the kept checkpoint is the latest one (= the last epoch)
                self.monitor = None
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own IO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and self.dirpath and "://" not in str(self.dirpath):
            ensure_writable(self.dirpath, "checkpoint.dirpath")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # Lightning ≥ 2.6 defers step-triggered saves until the monitored val metric exists
        # (the whole first epoch of every process, and each epoch's last step). last.ckpt is
        # the pre-emption safety net, so refresh it every `every_n_train_steps` regardless.
        step = trainer.global_step
        if (
            self.save_last is True and self._every_n_train_steps >= 1
            and step % self._every_n_train_steps == 0
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            previous = self._last_global_step_saved
            save_last_checkpoint(self, trainer)
            self._last_global_step_saved = previous  # the deferred top-k save still happens

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        # Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint was saved at the same
        # step, so after the best epoch `last` would lag behind; resume needs the latest one.
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            save_last_checkpoint(self, trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in setup: only after the restore does trainer.ckpt_path tell a resumed
        # fit (whose files these are) from a fresh one; nothing has been saved yet
        if (
            trainer.ckpt_path is None and self.existing != "overwrite" and self.dirpath
            and "://" not in str(self.dirpath)
        ):
            self._set_aside_previous_run(trainer)

    def _set_aside_previous_run(self, trainer: L.Trainer) -> None:
        dirpath = Path(self.dirpath)
        old = sorted(dirpath.glob(f"*{self.FILE_EXTENSION}"))
        if old and self.existing == "error":
            raise ConfigError(
                "checkpoint.dirpath", str(dirpath),
                f"it holds {len(old)} checkpoint(s) of an earlier run ({old[0].name}, …): resume "
                "it with --ckpt_path=last, choose another dirpath, or set "
                "checkpoint.existing=archive",
            )
        if old and trainer.is_global_zero:
            archive = dirpath / "previous" / time.strftime("%Y%m%d-%H%M%S")
            while archive.exists():  # two fresh runs within a second
                archive = archive.with_name(archive.name + "+")
            archive.mkdir(parents=True)
            for path in old:
                shutil.move(str(path), archive / path.name)
            warnings.warn(
                f"{dirpath} held {len(old)} checkpoint(s) of an earlier run; moved them to "
                f"{archive} (to resume that run instead, pass --ckpt_path=last)",
                stacklevel=2,
            )
        trainer.strategy.barrier("kd_checkpoint_archive")
