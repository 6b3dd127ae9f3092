"""Every use of Lightning internals, in one place.

Lightning has no public hook for four things kd-lightning needs: where the running epoch
stands (for the resumable sampler, per-step seeding and the running epoch means), a
``last.ckpt`` refresh that does not wait for a new best checkpoint, and the SIGTERM flag
that pre-emption defers across a validation pass. Each is read or written here and nowhere
else; ``tests/test_lightning_compat.py`` checks that every attribute still exists, so a
Lightning upgrade that moves one fails there, by name, instead of deep inside a fit.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


def _batch_progress(trainer: Any) -> Any:
    return trainer.fit_loop.epoch_loop.batch_progress


def batches_done_in_epoch(trainer: Any) -> int:
    """Training batches the current epoch has fetched so far."""
    return int(_batch_progress(trainer).current.ready)


def batches_done_in_fit(trainer: Any) -> int:
    """Training batches fetched since the fit began (resumes included): a step counter that,
    unlike ``global_step``, also advances under gradient accumulation."""
    return int(_batch_progress(trainer).total.ready)


def epoch_is_over(trainer: Any) -> bool:
    """Whether the current training epoch has consumed its last batch (a checkpoint saved
    now resumes at the start of the next epoch)."""
    progress = _batch_progress(trainer)
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches


def save_last_checkpoint(callback: ModelCheckpoint, trainer: Any) -> None:
    """Write ``callback``'s ``last.ckpt`` now (Lightning 2.6 refreshes it only together
    with a new best checkpoint)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def set_received_sigterm(trainer: Any, value: bool) -> None:
    """Set the flag that makes Lightning stop (and broadcast the stop to DDP ranks)."""
    trainer._signal_connector.received_sigterm = value
