"""Teacher-output cache: run the frozen teacher(s) once per (sample, augmentation view).

A frozen teacher in eval mode is a pure function of its input, so its logits (and the
feature maps the heads ask for) can be stored and reused, *provided the input is the very
same tensor*. With augmentation that holds only if the augmentation is a function of the
sample, not of chance: the cache is keyed by ``(batch["index"], batch["view"])`` and
relies on the data's deterministic augmentation views (``data.augment_views: K``, see
``kd_lightning.data.tensor_augment``): view ``epoch % K`` of every image is the same
image every time, so after K epochs every teacher output is a cache hit.

Refused (``ConfigError``, before any training step): a training set that augments
randomly (``augment_views: 0``), and batches without ``index``/``view`` or with view -1.

Storage is dense tensors ``(N, V, ...)`` per teacher and per output, grown on demand and
filled in place, so a lookup is one gather per output and a miss runs the teachers on the
missing samples only. ``device: cpu`` keeps large feature maps in host memory. The cache
lives in memory only: it is rebuilt after a restart, and each DDP rank caches the samples
it sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.outputs import ModelOutput

#: the teachers on a (sub-)batch dict
Compute = Callable[[dict[str, Any]], list[ModelOutput]]


class _Table:
    """One stage's outputs of every teacher: dense ``(N, V, *shape)`` tensors + fill mask."""

    def __init__(self) -> None:
        self.filled: Tensor | None = None  # bool (N, V)
        self.members: list[dict[str, Tensor]] = []  # per teacher: "logits"/feature → (N, V, ...)

    def _grow(self, n: int, v: int, fresh: list[ModelOutput], device: torch.device) -> None:
        old_n, old_v = (0, 0) if self.filled is None else self.filled.shape
        if n <= old_n and v <= old_v:
            return
        n, v = max(n, 2 * old_n), max(v, old_v)  # amortised growth along the sample axis

        def resized(old: Tensor | None, row: Tensor) -> Tensor:
            new = torch.zeros((n, v, *row.shape), dtype=row.dtype, device=device)
            if old is not None:
                new[: old.shape[0], : old.shape[1]] = old
            return new

        self.filled = resized(self.filled, torch.zeros((), dtype=torch.bool))
        if not self.members:
            self.members = [
                {k: resized(None, t[0]) for k, t in {"logits": m.logits, **m.features}.items()}
                for m in fresh
            ]
        else:
            self.members = [{k: resized(t, t[0, 0]) for k, t in m.items()} for m in self.members]

    def lookup(
        self, index: Tensor, view: Tensor, compute: Compute, batch: dict[str, Any]
    ) -> tuple[list[ModelOutput], int]:
        """The outputs for ``(index, view)`` and how many of them had to be computed."""
        if self.filled is None:
            missing = torch.ones_like(index, dtype=torch.bool)
        else:
            # clamped gathers, not boolean indexing: the only host sync is the miss count
            n, v = self.filled.shape
            inside = (index < n) & (view < v)
            missing = ~(self.filled[index.clamp(max=n - 1), view.clamp(max=v - 1)] & inside)
        n_missing = int(missing.sum())
        if n_missing:
            rows = missing.nonzero().flatten()
            fresh = compute(batch_rows(batch, rows, len(index)))  # the teachers see the missing samples only
            device = index.device if self.filled is None else self.filled.device
            self._grow(int(index.max()) + 1, int(view.max()) + 1, fresh, device)
            i, j = index[rows], view[rows]
            for table, out in zip(self.members, fresh):
                for k, t in {"logits": out.logits, **out.features}.items():
                    if t.shape[1:] != table[k].shape[2:]:
                        raise ConfigError(
                            "model.teacher_cache", True,
                            f"teacher output {k!r} changes shape between batches "
                            f"({tuple(table[k].shape[2:])} vs {tuple(t.shape[1:])}, e.g. token "
                            "features under dynamic padding); cache logit heads only, or turn "
                            "off model.teacher_cache",
                        )
                    table[k][i, j] = t.to(table[k].device)
            self.filled[i, j] = True
        device = batch["index"].device  # where the batch is (index itself may be moved to cpu)
        outputs = [
            ModelOutput(
                table["logits"][index, view].to(device, non_blocking=True),
                {k: t[index, view].to(device, non_blocking=True)
                 for k, t in table.items() if k != "logits"},
            )
            for table in self.members
        ]
        return outputs, n_missing


class TeacherCache:
    """Teacher outputs keyed by (sample index, augmentation view), one table per stage.

    Args:
        device: ``auto`` keeps the cache where the outputs are (the training device);
            ``cpu`` keeps it in host memory (for large feature maps).
    """

    def __init__(self, device: Literal["auto", "cpu"] = "auto") -> None:
        if device not in ("auto", "cpu"):
            raise ConfigError("model.teacher_cache_device", device, "use auto or cpu")
        self.device = device
        self.tables: dict[str, _Table] = {}
        #: set once ``check_cache_data`` has vouched for the DataModule: skips the
        #: per-batch view check (a host sync)
        self.data_checked = False
        self.hits = 0  # samples served from the cache
        self.misses = 0  # samples the teachers ran on

    def __call__(self, stage: str, batch: dict[str, Any], compute: Compute) -> list[ModelOutput]:
        """The teachers' outputs for ``batch``, computing (and storing) only the misses."""
        index, view = batch_keys(batch, check_views=not self.data_checked)
        batch = {**batch, "index": index}
        if self.device == "cpu":
            index, view = index.cpu(), view.cpu()
        table = self.tables.setdefault(stage, _Table())
        with torch.no_grad():
            out, computed = table.lookup(index, view, compute, batch)
        self.misses += computed
        self.hits += len(index) - computed
        return out

    def __len__(self) -> int:
        """Number of cached (stage, sample, view) entries."""
        return sum(int(t.filled.sum()) for t in self.tables.values() if t.filled is not None)

    def nbytes(self) -> int:
        return sum(
            x.numel() * x.element_size()
            for t in self.tables.values() for m in t.members for x in m.values()
        )


def batch_rows(batch: dict[str, Any], rows: Tensor, n: int) -> dict[str, Any]:
    """The samples ``rows`` of every per-sample tensor in ``batch``."""
    return {
        k: v[rows.to(v.device)] if isinstance(v, Tensor) and v.ndim and len(v) == n else v
        for k, v in batch.items()
    }


def batch_keys(batch: dict[str, Any], check_views: bool = True) -> tuple[Tensor, Tensor]:
    """The (index, view) keys of a batch, for the memory cache and the disk store alike."""
    if not isinstance(batch, dict) or "index" not in batch or "view" not in batch:
        raise ConfigError(
            "model.performance.teacher_cache", "on",
            "the batches carry no 'index'/'view' keys to key teacher outputs on; use a "
            "kd-lightning DataModule (or yield them) or set teacher_cache: off",
        )
    index, view = batch["index"].long(), batch["view"].long()
    if check_views and bool((view < 0).any()):
        raise ConfigError(
            "data.augment_views", 0,
            "model.performance.teacher_cache needs the same input every time a sample is seen, "
            "but this training data is augmented at random: set data.augment_views to K >= 1 "
            "(K fixed views per image) or data.augment=false, or set teacher_cache: off",
        )
    return index, view


def cache_stage(trainer: Any) -> str | None:
    """Which table a teacher forward reads: ``train``, ``val``, or None (no caching: test,
    predict, or no trainer). Test splits index their own array, so they never share keys."""
    if trainer is None:
        return None
    if trainer.training:
        return "train"
    if trainer.validating or trainer.sanity_checking:
        return "val"
    return None


def check_cache_data(datamodule: Any) -> bool:
    """Refuse, at setup, a DataModule whose training augmentation makes the cache wrong.
    True when the DataModule vouches for its batches (it reports ``augments_randomly``)."""
    if getattr(datamodule, "augments_randomly", False):
        raise ConfigError(
            "data.augment_views", getattr(datamodule, "augment_views", 0),
            "model.teacher_cache needs deterministic augmentation: set data.augment_views to "
            "K >= 1 (each image gets K fixed augmented views, view = epoch % K) or "
            "data.augment=false, or turn off model.teacher_cache",
        )
    return hasattr(datamodule, "augments_randomly")
