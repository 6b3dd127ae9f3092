"""Exact mid-epoch resume: a seeded, resumable training order and step-seeded randomness.

Lightning 2.x restores weights, optimizer, schedulers and loop counters from a checkpoint,
but a plain ``DataLoader(shuffle=True)`` restarts the interrupted epoch with a *new* random
order (Lightning warns "your dataloader is not resumable"), so a resumed run trains on
different batches than an uninterrupted one. Two pieces make resume exact:

* ``ResumableSampler`` shuffles by ``seed + epoch`` (like ``DistributedSampler``, which it
  is, so Lightning calls ``set_epoch`` and never swaps it out under DDP) and can skip the
  samples an interrupted epoch already trained on.
* ``ResumableTrainOrder`` (a DataModule mixin) saves ``{epoch, consumed}`` in every
  checkpoint through the DataModule's ``state_dict`` — *consumed* counted from the fit
  loop's progress, not from the loader, because Lightning prefetches a batch ahead — and
  re-seeds torch's global RNG before every training batch from ``(seed, rank, batch
  number)`` (as fairseq does per update), so dropout, on-device augmentation and any head
  that samples (e.g. CRD negatives) draw the same numbers whether or not the run was
  interrupted, with no RNG state to save.

Not covered: fresh-random *PIL* augmentation inside the DataLoader (``augment: true`` with
``augment_views: 0`` and ``augment_on_device: false``) draws from the loader's RNG while
batches are prefetched, so after a mid-epoch resume those draws differ; use
``augment_views`` or ``augment_on_device`` where bit-exact resume matters.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from kd_lightning.lightning_compat import batches_done_in_epoch, batches_done_in_fit, epoch_is_over

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_seed(seed: int, rank: int, batch: int) -> int:
    """The torch seed of training batch number ``batch`` on ``rank``: a pure function of its
    arguments, well mixed, and < 2⁶³ (what ``torch.manual_seed`` accepts)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ rank) ^ batch) >> 1


def training_seed(default: int = 0) -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (one replica when not distributed) that can resume mid-epoch.

    The order of epoch ``e`` is a permutation seeded by ``seed + e``; ``skip`` samples of the
    current epoch are left out once (set on resume, cleared when the epoch changes).
    ``__len__`` stays the full epoch, which is what Lightning's restored progress counts
    against.

    Args:
        dataset: the training dataset.
        views: K > 0 yields ``(index, epoch % K)`` pairs for datasets with deterministic
            augmentation views (``kd_lightning.data.tensor_augment``); 0 yields indices.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        views: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self.views = int(views)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())[self.skip :]
        if self.views:
            view = self.epoch % self.views
            return ((int(i), view) for i in indices)
        return iter(indices)


class ResumableTrainOrder:
    """Mixin for a ``LightningDataModule`` with a ``batch_size``: build the train sampler
    with ``self.train_sampler(dataset)`` and call ``self.seed_step_rng()`` at the start of
    ``on_after_batch_transfer``. See the module docstring."""

    _train_order: ResumableSampler | None = None
    _pending_order: dict[str, int] | None = None

    def train_sampler(self, dataset: Dataset, views: int = 0, seed: int = 0) -> ResumableSampler:
        trainer = getattr(self, "trainer", None)
        sampler = ResumableSampler(
            dataset,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=training_seed(seed),
            views=views,
        )
        pending, self._pending_order = self._pending_order, None
        if pending:
            if pending["seed"] != sampler.seed or pending["num_samples"] != sampler.num_samples:
                warnings.warn(
                    f"the checkpoint's training order (seed {pending['seed']}, "
                    f"{pending['num_samples']} samples per rank) does not match this run's "
                    f"(seed {sampler.seed}, {sampler.num_samples}): the interrupted epoch "
                    "restarts from its first batch",
                    stacklevel=2,
                )
            else:
                # set before Lightning creates the iterator (it calls set_epoch only later)
                sampler.set_epoch(pending["epoch"])
                sampler.skip = pending["consumed"]
        self._train_order = sampler
        return sampler

    def seed_step_rng(self) -> None:
        """Seed torch's RNGs for the training batch about to run (no-op outside training)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training or trainer.sanity_checking:
            return
        batch = batches_done_in_fit(trainer)
        seed = step_seed(training_seed(), trainer.global_rank, batch)
        # Only the generators this rank draws from: torch.manual_seed also seeds every other
        # backend, and each one not initialised records a stack trace (1-2 ms per step).
        torch.default_generator.manual_seed(seed)
        device = trainer.strategy.root_device
        if device.type != "cpu":
            torch.get_device_module(device.type).manual_seed(seed)

    # -- LightningDataModule checkpoint hooks ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        sampler, trainer = self._train_order, getattr(self, "trainer", None)
        if sampler is None or trainer is None:
            return state
        done = epoch_is_over(trainer)
        state["train_order"] = {
            "seed": sampler.seed,
            "num_samples": sampler.num_samples,
            # an epoch that is over resumes at the start of the next one
            "epoch": sampler.epoch + 1 if done else sampler.epoch,
            "consumed": 0 if done else batches_done_in_epoch(trainer) * int(self.batch_size),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._pending_order = state_dict.get("train_order")
        if self._pending_order:
            # Lightning cannot see that the order is restored through the DataModule
            warnings.filterwarnings(
                "ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*"
            )
