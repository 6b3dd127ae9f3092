"""A causal-LM teacher's top-k next-token distributions on disk, per (sample, token).

``TeacherStore`` (``modules/teacher_store.py``) keeps one fixed-size row per (sample,
augmentation view). An LM sample has a variable number of completion tokens, so this store
is a ragged table: one row per completion token of every sample, in sample order, and an
``offsets`` array ([N + 1], int64) whose slice ``offsets[i]:offsets[i + 1]`` holds sample
i's rows. Per stage, raw memory-mapped files:

* ``ids``    int32   [N_tokens, k]  the teacher's k most likely next tokens;
* ``values`` fp16/32 [N_tokens, k]  their log-probabilities (temperature 1);
* ``tail``   fp32    [N_tokens]     log of the mass of the other V − k tokens, computed as a
  logsumexp over them (exact, not 1 − Σ top-k, which cancels);
* ``target`` int32   [N_tokens]     the token that followed (checks the data on every read).

With the tail mass stored, three ways to treat the rest of the vocabulary are exact
(``tail=``): ``drop`` (the top-k renormalised), ``uniform`` (the tail mass spread evenly over
the other V − k tokens) and ``bucket`` (a (k + 1)-way distribution: the top-k and one tail
bucket, against the student's own top-k-of-the-teacher + rest). At k = V every mode is the
teacher's distribution (fp32 values: equal within fp32 rounding).

``meta.json`` (written last: its presence means the store is complete) holds the format, k,
the vocabulary, the value dtype, per-stage sample and token counts, and the fingerprint of
the teacher (a SHA-256 of its weights), the tokenizer (its vocabulary digest) and the chat
template. Opening a store for another teacher, tokenizer or template is a one-line
``ConfigError``.

The store holds the teacher's distributions on the dataset's own completions: it serves
off-policy and sequence-KD data only (a student's on-policy generations are new token
sequences, which the teacher must score live).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm.divergences import DIVERGENCES
from kd_lightning.modules.teacher_store import topk_logprobs

FORMAT_VERSION = 1
Tail = Literal["drop", "uniform", "bucket"]
SERVES = "off-policy and sequence-KD data only (on-policy generations need the live teacher)"


def chat_template_digest(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def store_fingerprint(teacher: nn.Module, tokenizer: Any) -> dict[str, str | None]:
    """What a store was written from: teacher weights, tokenizer vocabulary, chat template."""
    from kd_lightning.data.lm import tokenizer_digest
    from kd_lightning.modules.teacher import fingerprint

    return {
        "teacher": fingerprint(teacher),
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": chat_template_digest(tokenizer),
    }


@dataclass
class StoredTokens:
    """The stored rows of some completion tokens: ``ids``/``values`` [n, k], ``tail`` and
    ``targets`` [n] (fp32 values; int64 ids)."""

    ids: Tensor
    values: Tensor
    tail: Tensor
    targets: Tensor

    def to(self, device: torch.device | str) -> StoredTokens:
        return StoredTokens(
            *(x.to(device) for x in (self.ids, self.values, self.tail, self.targets))
        )


def teacher_logits(rows: StoredTokens, vocab: int, tail: Tail = "uniform") -> Tensor:
    """Dense teacher log-probabilities ``[n, V]`` rebuilt from stored rows: ``uniform`` spreads
    the tail mass over the V − k other tokens, ``drop`` leaves them at −inf (the softmax
    renormalises the top-k). At k = V both are the stored distribution."""
    n, k = rows.values.shape
    if tail not in ("uniform", "drop"):
        raise ConfigError("tail", tail, "dense logits take tail 'uniform' or 'drop'")
    if tail == "uniform" and k < vocab:
        fill = (rows.tail - math.log(vocab - k))[:, None].expand(n, vocab).clone()
    else:
        fill = rows.values.new_full((n, vocab), -math.inf)
    return fill.scatter_(-1, rows.ids, rows.values)


def bucket_log_probs(
    student: Tensor, rows: StoredTokens, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probabilities over k + 1 outcomes: the teacher's k stored tokens
    and one bucket for all others, ``[n, k + 1]`` each; the student's bucket is the
    logsumexp of its log-probabilities outside the teacher's k tokens."""
    s = F.log_softmax(
        (student if student.dtype == torch.float64 else student.float()) / temperature, -1
    )
    top = s.gather(-1, rows.ids)
    rest = s.scatter(-1, rows.ids, -math.inf).logsumexp(-1, keepdim=True)
    teacher = torch.cat([rows.values.to(s.dtype), rows.tail.to(s.dtype)[:, None]], -1)
    return torch.cat([top, rest], -1), teacher


def store_token_loss(
    student: Tensor,
    rows: StoredTokens,
    divergence: str = "forward_kl",
    tail: Tail = "uniform",
    temperature: float = 1.0,
    **kwargs: Any,
) -> Tensor:
    """A ``kd_lightning.losses.lm.divergences`` function per completion token, between the
    student's logits ``[n, V]`` and the stored teacher rows; returns ``[n]``.

    ``kwargs`` go to the divergence (``beta``, ``continuous``, ``alpha``). The store holds
    temperature-1 log-probabilities: ``temperature`` ≠ 1 divides the rebuilt teacher
    log-probabilities, which equals tempering the teacher only at k = V, and is refused for
    ``bucket`` (a tail bucket cannot be re-tempered)."""
    if divergence not in DIVERGENCES:
        raise ConfigError("divergence", divergence, f"use one of {sorted(DIVERGENCES)}")
    fn = DIVERGENCES[divergence]
    if tail == "bucket":
        if temperature != 1.0:
            raise ConfigError("temperature", temperature, "a tail bucket needs temperature 1")
        s, t = bucket_log_probs(student, rows)
        return fn(s, t, **kwargs)
    t = teacher_logits(rows, student.shape[-1], tail)
    return fn(
        student,
        t.to(student.dtype) if student.dtype == torch.float64 else t,
        temperature=temperature,
        **kwargs,
    )


class _Stage:
    """One stage's ragged table, memory-mapped read-only."""

    def __init__(self, root: Path, stage: str, meta: dict[str, Any]) -> None:
        info = meta["stages"][stage]
        n_tok, k = int(info["tokens"]), int(meta["k"])
        shape = (max(n_tok, 1), k)  # np.memmap refuses a zero-size map
        self.offsets = np.load(root / f"{stage}_offsets.npy", mmap_mode="r")
        self.ids = np.memmap(root / f"{stage}_ids.bin", np.int32, "r", shape=shape)
        self.values = np.memmap(root / f"{stage}_values.bin", meta["value_dtype"], "r", shape=shape)
        self.tail = np.memmap(root / f"{stage}_tail.bin", np.float32, "r", shape=shape[:1])
        self.target = np.memmap(root / f"{stage}_target.bin", np.int32, "r", shape=shape[:1])


class LMTokenStore:
    """A written store, opened read-only and checked against the run's teacher/tokenizer.

    Args:
        path: the store's directory.
        fingerprint: ``store_fingerprint(teacher, tokenizer)`` of the run; any field that
            differs from the store's header is refused (None skips the check).
        field: the config field that named the path, for error messages.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any] | None = None,
        field: str = "model.token_store",
    ) -> None:
        self.path, self.field = Path(path), field
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise ConfigError(
                field,
                str(self.path),
                "no token store there: write it first "
                "(kd_lightning.modules.lm_token_store.write_token_store)",
            )
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise ConfigError(
                field, str(self.path), "written by another kd-lightning version: rewrite it"
            )
        for key, fix in (
            ("teacher", "it was written by another teacher (weights differ)"),
            ("tokenizer", "it was written with another tokenizer (vocabulary differs)"),
            ("chat_template", "it was written with another chat template"),
        ):
            if fingerprint is not None and self.meta["fingerprint"].get(key) != fingerprint.get(
                key
            ):
                raise ConfigError(field, str(self.path), f"{fix}: rewrite it or use a new path")
        self.k, self.vocab = int(self.meta["k"]), int(self.meta["vocab_size"])
        self.stages = {s: _Stage(self.path, s, self.meta) for s in self.meta["stages"]}

    def rows(self, stage: str, index: Iterable[int]) -> tuple[StoredTokens, list[int]]:
        """The rows of samples ``index`` (in that order), concatenated, and each one's count."""
        if stage not in self.stages:
            raise ConfigError(
                self.field, stage, f"the store has no {stage!r} stage ({sorted(self.stages)})"
            )
        table = self.stages[stage]
        index = np.asarray(list(index), dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(table.offsets) - 1):
            raise ConfigError(
                self.field,
                str(self.path),
                f"sample {int(index.max())} is beyond the {len(table.offsets) - 1} "
                f"samples of its {stage} stage: not the data it was written for",
            )
        starts, ends = table.offsets[index], table.offsets[index + 1]
        counts = (ends - starts).tolist()
        sel = (
            np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
            if len(index)
            else np.zeros(0, np.int64)
        )
        rows = StoredTokens(
            torch.from_numpy(table.ids[sel].astype(np.int64)),
            torch.from_numpy(table.values[sel].astype(np.float32)),
            torch.from_numpy(np.asarray(table.tail[sel], dtype=np.float32)),
            torch.from_numpy(table.target[sel].astype(np.int64)),
        )
        return rows, counts

    def batch_rows(self, stage: str, index: Tensor, mask: Tensor, targets: Tensor) -> StoredTokens:
        """The rows of a batch's completion tokens, in ``mask`` order (row-major), checked:
        each sample's stored token count and next tokens must be the batch's."""
        rows, counts = self.rows(stage, index.tolist())
        if counts != mask.sum(1).tolist() or not torch.equal(rows.targets, targets[mask].cpu()):
            raise ConfigError(
                self.field,
                str(self.path),
                f"the batch's completion tokens differ from the stored {stage} "
                "ones: the data (split, max_length, tokenizer) is not the one it "
                "was written for",
            )
        return rows.to(mask.device)

    def dense_logits(
        self, stage: str, index: Tensor, mask: Tensor, targets: Tensor, tail: Tail = "uniform"
    ) -> Tensor:
        """``[B, T, V]`` teacher log-probabilities on the completion positions of ``mask``
        (other positions 0), the shape a ``TokenOutput``'s logits have for the LM heads."""
        rows = self.batch_rows(stage, index, mask, targets)
        out = torch.zeros((*mask.shape, self.vocab), device=mask.device)
        out[mask] = teacher_logits(rows, self.vocab, tail)
        return out

    def nbytes_per_token(self) -> float:
        """Bytes on disk per stored completion token, offsets and header included."""
        total = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        tokens = sum(int(s["tokens"]) for s in self.meta["stages"].values())
        return total / max(tokens, 1)


class _StageWriter:
    def __init__(self, root: Path, stage: str, value_dtype: str) -> None:
        self.root, self.stage = root, stage
        self.files = {
            name: open(root / f"{stage}_{name}.bin", "wb")
            for name in ("ids", "values", "tail", "target")
        }
        self.value_dtype = np.dtype(value_dtype)
        self.counts: list[int] = []

    def add(
        self, values: Tensor, ids: Tensor, tail: Tensor, target: Tensor, counts: list[int]
    ) -> None:
        self.files["ids"].write(ids.cpu().numpy().astype(np.int32).tobytes())
        self.files["values"].write(values.cpu().numpy().astype(self.value_dtype).tobytes())
        self.files["tail"].write(tail.cpu().numpy().astype(np.float32).tobytes())
        self.files["target"].write(target.cpu().numpy().astype(np.int32).tobytes())
        self.counts.extend(counts)

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            f.close()
        offsets = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=offsets[1:])
        np.save(self.root / f"{self.stage}_offsets.npy", offsets)
        return {"samples": len(self.counts), "tokens": int(offsets[-1])}


def topk_rows(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k log-probabilities, their ids, log of the remaining mass) per row of ``[n, V]``."""
    values, ids = topk_logprobs(logits, k)
    if k >= logits.shape[-1]:
        return values, ids, values.new_full(values.shape[:1], -math.inf)
    log_p = F.log_softmax(logits.float(), -1)
    tail = log_p.scatter(-1, ids, -math.inf).logsumexp(-1)
    return values, ids, tail


@torch.inference_mode()
def write_token_store(
    path: str | Path,
    teacher: nn.Module,
    datamodule: Any,
    k: int = 20,
    value_dtype: Literal["float16", "float32"] = "float16",
    stages: Iterable[str] = ("train", "val"),
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    field: str = "--output",
) -> LMTokenStore:
    """Run ``teacher`` once over a ``PromptCompletionDataModule``'s splits (in dataset order,
    unshuffled) and write each completion token's top-k distribution. The samples' order is
    the dataset's, so a sample's dataset index is its row in ``offsets``."""
    from torch.utils.data import DataLoader

    from kd_lightning.data.lm import PromptCompletionCollator

    path = Path(path)
    if (path / "meta.json").exists():
        raise ConfigError(field, str(path), "a token store is already there: use a new path")
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    vocab = len(tokenizer)
    if not 1 <= k <= vocab:
        raise ConfigError("--k", k, f"use 1 <= k <= the tokenizer's {vocab} tokens")
    if value_dtype not in ("float16", "float32"):
        raise ConfigError("--value_dtype", value_dtype, "use float16 or float32")
    path.mkdir(parents=True, exist_ok=True)
    teacher = teacher.to(device).eval()
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "k": int(k),
        "vocab_size": vocab,
        "value_dtype": value_dtype,
        "fingerprint": store_fingerprint(teacher, tokenizer),
        "serves": SERVES,
        "stages": {},
    }
    collate = PromptCompletionCollator(tokenizer.pad_token_id)
    for stage in stages:
        if stage not in datamodule.splits:
            raise ConfigError("--stages", stage, f"use one of {sorted(datamodule.splits)}")
        writer = _StageWriter(path, stage, value_dtype)
        loader = DataLoader(
            datamodule.splits[stage], batch_size=batch_size, shuffle=False, collate_fn=collate
        )
        for batch in loader:
            batch = {key: v.to(device) for key, v in batch.items()}
            logits = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits[:, :-1, :vocab]
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            values, ids, tail = topk_rows(logits[mask], k)
            writer.add(values, ids, tail, targets[mask], mask.sum(1).tolist())
        meta["stages"][stage] = writer.close()
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / "meta.json")  # last: a store without it is incomplete
    return LMTokenStore(path, meta["fingerprint"], field)


__all__ = [
    "LMTokenStore",
    "StoredTokens",
    "bucket_log_probs",
    "store_fingerprint",
    "store_token_loss",
    "teacher_logits",
    "topk_rows",
    "write_token_store",
]
