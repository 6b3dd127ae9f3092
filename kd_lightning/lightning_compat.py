"""Where a running fit stands, read from Lightning's loop state in one place (it is not a
public API): the DataModule's resumable sampler and the modules' running epoch means both
store "the epoch so far" in a checkpoint only while the epoch is still running."""

from __future__ import annotations

from typing import Any


def epoch_is_over(trainer: Any) -> bool:
    """Whether the current training epoch has consumed its last batch (a checkpoint saved
    now resumes at the start of the next epoch)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches
