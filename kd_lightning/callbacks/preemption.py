"""Save a resumable checkpoint when the job is told to stop (SIGTERM), then exit.

Clusters stop jobs with SIGTERM: SLURM on pre-emption and, with ``--signal=TERM@90``,
90 s before the time limit; SIGKILL follows after a grace period. Lightning's signal
connector only sets ``trainer.received_sigterm`` and raises ``SIGTERMException`` at the next
step boundary — without saving anything. This callback saves ``last.ckpt`` at that boundary
(the place where ``ModelCheckpoint(every_n_train_steps=…)`` saves, so the checkpoint
resumes exactly), lets a validation that is under way finish first (so its metrics are
whole), and leaves the exit to Lightning. ``kd-lightning`` then exits with status 143
(128 + SIGTERM) so a scheduler does not mistake the run for a finished one.

Resume with ``--ckpt_path=last`` (picks the newest ``*last*.ckpt`` in ``checkpoint.dirpath``
and starts fresh when there is none, so one command serves first start and every requeue).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kd_lightning.lightning_compat import set_received_sigterm

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM, save ``{dirpath}/{filename}.ckpt`` at the next step boundary.

    Args:
        dirpath: where to save; default: the ModelCheckpoint's ``dirpath`` (so
            ``--ckpt_path=last`` finds it), else ``trainer.default_root_dir``.
        filename: file name without ``.ckpt``; default ``last`` (ModelCheckpoint's
            ``CHECKPOINT_NAME_LAST``), so the newest state is always ``last.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = ModelCheckpoint.CHECKPOINT_NAME_LAST) -> None:
        self.dirpath = dirpath
        self.filename = filename
        #: where the pre-emption checkpoint went (None until one was saved)
        self.saved_path: str | None = None
        self._deferred: int | None = None  # a SIGTERM held back during validation
        self._lightning_handler: Any = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        dirpath = self.dirpath
        if dirpath is None:
            ckpt = trainer.checkpoint_callback
            dirpath = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
        return Path(dirpath) / f"{self.filename}.ckpt"

    def _save(self, trainer: L.Trainer, where: str) -> None:
        if self.saved_path is not None:
            return
        path = self.checkpoint_path(trainer)
        # every rank must call save_checkpoint (it synchronises); only rank 0 writes
        trainer.save_checkpoint(path)
        self.saved_path = str(path)
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath and Path(ckpt.dirpath) / (
            f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        ) == path:
            # adopt the file as ModelCheckpoint's own last.ckpt, or its version counter
            # would write the same state again as last-v1.ckpt
            ckpt.last_model_path = str(path)
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM received: saved %s at epoch %d, global step %d (%s). "
                "Resume with --ckpt_path=%s (or --ckpt_path=last).",
                path, trainer.current_epoch, trainer.global_step, where, path,
            )

    # -- training: save at the step boundary, before Lightning raises SIGTERMException -----
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.received_sigterm:
            self._save(trainer, "after a training step")

    # -- validation: finish it, then save -------------------------------------------------------
    # Lightning aborts a validation after the batch during which SIGTERM arrives, leaving the
    # epoch with half-computed metrics; a validation pass is short next to a SIGKILL grace
    # period. So while validating, SIGTERM is only recorded, and handed to Lightning's own
    # handler (flag, DDP broadcast, launcher) when the validation has ended.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or self.saved_path is not None:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        if trainer.received_sigterm:  # arrived just before validation started
            self._deferred = signal.SIGTERM
            set_received_sigterm(trainer, False)
        self._lightning_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._deferred = signum

    def _restore_handler(self) -> Any:
        handler, self._lightning_handler = self._lightning_handler, None
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        return handler

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        handler = self._restore_handler()
        if self._deferred is None:
            return
        signum, self._deferred = self._deferred, None
        if callable(handler) and not trainer.received_sigterm:
            handler(signum, None)  # Lightning's: sets received_sigterm, so it stops next
        set_received_sigterm(trainer, True)
        # ModelCheckpoint saves here too: a supported resume point, validation whole
        self._save(trainer, "after validation")

    # -- anything else (a SIGTERM between hooks): save what there is ----------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and trainer.global_step > 0:
            self._save(trainer, "on exit")
