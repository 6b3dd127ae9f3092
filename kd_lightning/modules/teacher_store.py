"""Teacher outputs on disk: each sample's top-k teacher log-probabilities, memory-mapped.

At ImageNet scale the teacher's forward dominates a KD step, and the in-memory
``TeacherCache`` (dense logits on the training device) does not fit: 1.28M images × K views
× 1000 classes × 4 bytes is 5 GB per view. ``TeacherStore`` keeps, per (sample,
augmentation view), the teacher's k largest log-probabilities (fp16) and their class ids
(int16, or int32 beyond 32767 classes) in ``.npy`` memory maps — 20 × (2 + 2) = 80 bytes
per view at k = 20 — and rebuilds logits from them: the k stored log-probabilities, and
the remaining probability mass spread uniformly over the other classes. At k = number of
classes this is the teacher's distribution up to fp16 rounding (``value_dtype: float32``
removes that); the softmax a KD head takes at any temperature is unchanged by the missing
log-partition (a constant shift).

It is called exactly like ``TeacherCache`` (``store(stage, batch, compute)`` →
``list[ModelOutput]``), keyed the same way by ``(batch["index"], batch["view"])``, and is
filled either ahead of training (``kd-lightning data store-teacher``) or on the fly: a miss
runs the teachers on the missing samples and writes them, so after K epochs (K views)
every training lookup is a read. Lookups always return the *stored* values, so the first
epoch trains on exactly what later epochs read.

Refused with a ``ConfigError``: data that augments at random, a store written for other
augmentation views (the DataModule's ``augmentation_signature``: transform, crop size and
ranges, number of views, view seed, normalisation), another teacher (fingerprint), another
k, class count or sample count, and heads that need teacher feature maps (only logits are
stored).

DDP: every rank writes the rows of the samples it sees into the same memory-mapped files
(distinct rows; a row is written completely before its ``filled`` flag). Ranks on one node
share the page cache, so each sees the others' rows. Across nodes a rank may not see a
row another node wrote; it then recomputes and rewrites the same values, which is
harmless. For multi-node runs write the store ahead with ``kd-lightning data
store-teacher`` and train read-only. The files are created once (an exclusive lock file
decides which process creates them; the others wait for ``meta.json``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.outputs import ModelOutput
from kd_lightning.modules.teacher_cache import batch_keys, batch_rows

Compute = Callable[[dict[str, Any]], list[ModelOutput]]
FORMAT_VERSION = 1


def topk_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest log-probabilities (T = 1) of each row, and their class ids."""
    values, indices = torch.topk(F.log_softmax(logits.float(), dim=-1), k, dim=-1)
    return values, indices


def reconstruct_logits(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """Logits whose softmax is the stored top-k distribution plus the remaining mass spread
    uniformly over the other ``num_classes − k`` classes."""
    values = values.float()
    k = values.shape[-1]
    if k >= num_classes:
        out = torch.empty((*values.shape[:-1], num_classes), dtype=torch.float32, device=values.device)
        return out.scatter_(-1, indices.long(), values)
    # log(1 − Σ p_topk), computed stably; the floor keeps log finite when the top-k hold
    # (numerically) all the mass
    rest = torch.log((-torch.expm1(torch.logsumexp(values, dim=-1, keepdim=True))).clamp_min(1e-12))
    fill = rest - math.log(num_classes - k)
    out = fill.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), values)


class _Table:
    """One stage's store: ``values``/``indices`` (N, V, T, k) and ``filled`` (N, V, T)
    memory maps, where T is the number of teachers."""

    def __init__(self, root: Path, stage: str, mode: Literal["r+", "r"]) -> None:
        self.values = np.load(root / f"{stage}_values.npy", mmap_mode=mode)
        self.indices = np.load(root / f"{stage}_indices.npy", mmap_mode=mode)
        self.filled = np.load(root / f"{stage}_filled.npy", mmap_mode=mode)

    @staticmethod
    def create(root: Path, stage: str, n: int, v: int, t: int, k: int, value_dtype: str, index_dtype: str) -> None:
        from numpy.lib.format import open_memmap

        for name, shape, dtype in (
            ("values", (n, v, t, k), value_dtype), ("indices", (n, v, t, k), index_dtype),
            ("filled", (n, v), "uint8"),
        ):
            arr = open_memmap(root / f"{stage}_{name}.npy", mode="w+", dtype=dtype, shape=shape)
            arr.flush()
            del arr


class TeacherStore:
    """Top-k teacher log-probabilities on disk, with ``TeacherCache``'s call signature.

    Args:
        path: the store's directory (created on first use).
        k: classes kept per sample (the rest of the mass is spread uniformly). k = the
            number of classes stores the whole distribution.
        value_dtype: ``float16`` (2 bytes per value) or ``float32`` (equal to the live
            teacher at full k). ``None`` (default): an existing store's own dtype, else float16.
        read_only: never write (a store filled ahead; a miss is an error).

    Call ``bind(datamodule, num_classes, fingerprints)`` before the first lookup: it
    creates or opens the files and checks they match the data and the teachers.
    """

    def __init__(
        self,
        path: str,
        k: int = 20,
        value_dtype: Literal["float16", "float32"] | None = None,
        read_only: bool = False,
        fields: dict[str, str] | None = None,
    ) -> None:
        # errors name what the user set: model.performance.store_topk, or --k of store-teacher
        self.fields = {"k": "teacher_store.k", "path": "model.teacher_store",
                       "value_dtype": "teacher_store.value_dtype", **(fields or {})}
        if k < 1:
            raise ConfigError(self.fields["k"], k, "use k >= 1 stored classes per sample (e.g. 20)")
        if value_dtype not in (None, "float16", "float32"):
            raise ConfigError(self.fields["value_dtype"], value_dtype, "use float16 or float32")
        self.path, self.k, self.value_dtype, self.read_only = Path(path), int(k), value_dtype, read_only
        self.meta: dict[str, Any] | None = None
        self.tables: dict[str, _Table] = {}
        self.data_checked = False  # set by DistillationModule.setup (TeacherCache's protocol)
        self.hits = 0
        self.misses = 0

    # -- opening ------------------------------------------------------------------------
    def bind(self, datamodule: Any, num_classes: int, fingerprints: list[str]) -> TeacherStore:
        """Create (or open and check) the store for this data and these teachers."""
        if getattr(datamodule, "augments_randomly", True):
            raise ConfigError(
                "data.augment_views", getattr(datamodule, "augment_views", 0),
                "the teacher store keeps one output per (sample, view), but this data is "
                "augmented at random: set data.augment_views to K >= 1 or data.augment=false",
            )
        signature = getattr(datamodule, "augmentation_signature", None)
        if signature is None:
            raise ConfigError(
                self.fields["path"], str(self.path),
                f"{type(datamodule).__name__} does not describe its augmentation views "
                "(augmentation_signature); use ImageFolderDataModule or StreamingImageDataModule",
            )
        if self.k > num_classes:
            raise ConfigError(self.fields["k"], self.k, f"use k <= the {num_classes} classes")
        wanted = {
            "format": FORMAT_VERSION, "k": self.k, "num_classes": int(num_classes),
            "value_dtype": self.value_dtype or "float16", "teachers": list(fingerprints),
            "signature": json.loads(json.dumps(signature)),
            "stages": {s: [int(n), int(v)] for s, (n, v) in store_shapes(datamodule).items()},
        }
        meta = self._open_or_create(wanted)
        if self.value_dtype is None:  # the fit reads a store in whichever dtype it was written
            wanted["value_dtype"] = self.value_dtype = meta.get("value_dtype", "float16")
        self._check(meta, wanted)
        self.meta = meta
        mode: Literal["r+", "r"] = "r" if self.read_only else "r+"
        self.tables = {s: _Table(self.path, s, mode) for s in meta["stages"]}
        return self

    def _open_or_create(self, wanted: dict[str, Any]) -> dict[str, Any]:
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            if self.read_only:
                raise ConfigError(
                    "teacher_store.path", str(self.path),
                    "no store there: write it with `kd-lightning data store-teacher` first",
                )
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path / "create.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:  # another rank creates it
                return self._wait_for(meta_file)
            os.close(fd)
            t = len(wanted["teachers"])
            index_dtype = "int16" if wanted["num_classes"] <= np.iinfo(np.int16).max else "int32"
            for stage, (n, v) in wanted["stages"].items():
                _Table.create(self.path, stage, n, v, t, self.k, wanted["value_dtype"], index_dtype)
            tmp = self.path / "meta.json.tmp"
            tmp.write_text(json.dumps(wanted, indent=1))
            os.replace(tmp, meta_file)  # last: its presence means the store is complete
        return json.loads(meta_file.read_text())

    @staticmethod
    def _wait_for(meta_file: Path, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not meta_file.is_file():
            if time.monotonic() > deadline:
                raise ConfigError(
                    "teacher_store.path", str(meta_file.parent),
                    f"create.lock exists but no meta.json appeared in {timeout:.0f} s: a creation "
                    "was interrupted; delete the directory and start again",
                )
            time.sleep(0.2)
        return json.loads(meta_file.read_text())

    def _check(self, meta: dict[str, Any], wanted: dict[str, Any]) -> None:
        where = f"the store at {self.path}"
        if meta.get("signature") != wanted["signature"]:
            diff = sorted(
                key for key in set(meta.get("signature", {})) | set(wanted["signature"])
                if meta.get("signature", {}).get(key) != wanted["signature"].get(key)
            )
            raise ConfigError(
                "teacher_store.path", str(self.path),
                f"{where} holds teacher outputs for other augmentation views (differs in {diff}: "
                f"stored {[meta.get('signature', {}).get(d) for d in diff]}, data "
                f"{[wanted['signature'].get(d) for d in diff]}); use the data settings it was "
                "written with, or a new store path",
            )
        for key, fix in (
            ("teachers", "it was written by another teacher: use a new store path"),
            ("k", "it was written with another k: set the same k or use a new store path"),
            ("num_classes", "it was written for another class count"),
            ("value_dtype", "it was written with another value_dtype"),
            ("stages", "it was written for another dataset size or number of views"),
            ("format", "it was written by another kd-lightning version: rewrite it"),
        ):
            if meta.get(key) != wanted[key]:
                raise ConfigError("teacher_store.path", str(self.path), f"{where}: {fix}")

    # -- the TeacherCache interface ---------------------------------------------------------
    def __call__(self, stage: str, batch: dict[str, Any], compute: Compute) -> list[ModelOutput]:
        """The teachers' (top-k) outputs for ``batch``, computing and storing the misses."""
        if self.meta is None:
            raise ConfigError(self.fields["path"], str(self.path), "call bind(datamodule, …) before use")
        if stage not in self.tables:
            raise ConfigError(self.fields["path"], stage, f"the store has no {stage!r} table")
        index, view = batch_keys(batch)
        table = self.tables[stage]
        n, v = table.filled.shape
        if bool((index >= n).any()) or bool((view >= v).any()):
            raise ConfigError(
                "teacher_store.path", str(self.path),
                f"a batch holds sample {int(index.max())} / view {int(view.max())} but the "
                f"{stage} store has {n} samples × {v} views: the data is not the one it was "
                "written for",
            )
        idx, vw = index.cpu().numpy(), view.cpu().numpy()
        missing = np.flatnonzero(table.filled[idx, vw] == 0)
        if len(missing):
            if self.read_only:
                raise ConfigError(
                    "teacher_store.read_only", True,
                    f"{len(missing)} samples of this batch are not in the store: fill it with "
                    "`kd-lightning data store-teacher` or set read_only=false",
                )
            rows = torch.as_tensor(missing, device=batch["index"].device)
            with torch.no_grad():
                fresh = compute(batch_rows(batch, rows, len(index)))
            self.write(stage, index[missing], view[missing], fresh)
        self.misses += len(missing)
        self.hits += len(idx) - len(missing)
        return self.read(stage, index, view, device=batch["index"].device)

    def write(self, stage: str, index: Tensor, view: Tensor, outputs: list[ModelOutput]) -> None:
        """Store the top-k of each teacher's logits for ``(index, view)``."""
        table = self.tables[stage]
        if any(out.features for out in outputs):
            raise ConfigError(
                self.fields["path"], str(self.path),
                "the loss heads ask for teacher feature maps, which the store does not keep "
                "(logits only): use the live teacher or model.teacher_cache for feature heads",
            )
        idx, vw = index.cpu().numpy(), view.cpu().numpy()
        for t, out in enumerate(outputs):
            values, classes = topk_logprobs(out.logits.detach(), self.k)
            table.values[idx, vw, t] = values.cpu().numpy().astype(table.values.dtype)
            table.indices[idx, vw, t] = classes.cpu().numpy().astype(table.indices.dtype)
        table.filled[idx, vw] = 1

    def read(self, stage: str, index: Tensor, view: Tensor, device: torch.device | str = "cpu") -> list[ModelOutput]:
        """Reconstructed logits of every teacher for ``(index, view)``."""
        table = self.tables[stage]
        idx, vw = index.cpu().numpy(), view.cpu().numpy()
        values = torch.from_numpy(np.ascontiguousarray(table.values[idx, vw]))
        classes = torch.from_numpy(np.ascontiguousarray(table.indices[idx, vw]).astype(np.int64))
        c = int(self.meta["num_classes"]) if self.meta else values.shape[-1]
        return [
            ModelOutput(reconstruct_logits(values[:, t], classes[:, t], c).to(device, non_blocking=True), {})
            for t in range(values.shape[1])
        ]

    def flush(self) -> None:
        for table in self.tables.values():
            for arr in (table.values, table.indices, table.filled):
                if isinstance(arr, np.memmap) and arr.mode != "r":
                    arr.flush()

    def __len__(self) -> int:
        """Stored (stage, sample, view) entries."""
        return sum(int(np.count_nonzero(t.filled)) for t in self.tables.values())

    def nbytes_per_entry(self) -> int:
        """Bytes on disk per (sample, view) for all teachers (values + class ids + flag)."""
        if not self.tables:
            return 0
        t = next(iter(self.tables.values()))
        per = t.values.shape[2] * self.k
        return per * (t.values.dtype.itemsize + t.indices.dtype.itemsize) + 1


def store_shapes(datamodule: Any) -> dict[str, tuple[int, int]]:
    """(index space, views) of the train and val stages of a set-up DataModule.

    The index space is the size of the array the ``index`` keys point into: the train
    split's file list (whose held-out part is the val split when there is no val folder),
    or for LitData streams the source's, recorded by ``kd-lightning data optimize``.
    """
    datamodule.setup("fit")
    views = int(datamodule.augment_views) if getattr(datamodule, "augment", True) else 1
    shapes = {}
    for stage, v in (("train", max(views, 1)), ("val", 1)):
        ds = getattr(datamodule, f"{stage}_set")
        if hasattr(ds, "samples"):
            n = len(ds.samples)
        elif hasattr(ds, "labels") and isinstance(ds.labels, Tensor):
            n = len(ds.labels)
        else:
            n = int(getattr(datamodule, "index_space", {}).get(stage, 0)) or len(ds)
        shapes[stage] = (n, v)
    return shapes
