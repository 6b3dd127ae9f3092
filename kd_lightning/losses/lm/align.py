"""Byte-offset token alignment between two tokenizers, for token-level losses on aligned spans.

In the manner of TRL's GOLD (huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8
trl/experimental/gold/gold_trainer.py L528-L551 ``_align_by_byte_offsets``, L553-L623
``_merge_probabilities_with_alignment_groups``): both tokenizations of the same completion
text are mapped to UTF-8 byte spans; the two token sequences are cut wherever both have a
token boundary at the same byte, which groups them into aligned spans (each span: the same
bytes, one or more tokens on each side). Within a span the tokens' log-probabilities add
(chain rule), so a span's log-probability is comparable across the two models, and a span's
merged next-token distribution ("observed": the first position's distribution times the
probability of the span's later, realised tokens) can be compared by ULD or, on the
vocabulary both tokenizers share, by any ``kd_lightning.losses.lm.divergences`` function.

Byte spans come from the tokens themselves: a byte-level BPE piece (GPT-2's byte → unicode
alphabet) is one character per byte, so a completion's byte spans are the running sum of
its pieces' lengths (exact, also for generated tokens, which have no source text); special
tokens (EOS) are zero-width. GOLD derives them from the fast tokenizer's character offsets
instead, then repairs the overlaps of multi-byte characters (trl/experimental/utils.py
L248-L268); for byte-level BPE without a prefix space the two agree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import check_temperature
from kd_lightning.losses.lm.heads import TokenHead
from kd_lightning.losses.outputs import TokenOutput
from kd_lightning.losses.schedules import Schedule


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: unicode character → the byte it stands for."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """The bytes each token stands for (b"" for special tokens), for a byte-level BPE."""
    decoder = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        if i in special:
            out.append(b"")
            continue
        try:
            out.append(bytes(decoder[c] for c in piece))
        except KeyError:
            raise ConfigError(
                "tokenizer",
                getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
                "byte-offset alignment needs a byte-level BPE tokenizer (GPT-2, Llama-3, Qwen)",
            ) from None
    return out


def byte_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each token of one completion, from byte 0."""
    spans, cursor = [], 0
    for piece in token_bytes(tokenizer, ids):
        spans.append((cursor, cursor + len(piece)))
        cursor += len(piece)
    return spans


def align_spans(
    student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]]
) -> list[tuple[list[int], list[int]]]:
    """Groups of (student token positions, teacher token positions) covering the same bytes:
    a group closes where both sides end a token at the same byte. Zero-width tokens (EOS)
    join the group they end in; any unmatched tail becomes one last group (GOLD's rule)."""
    groups: list[tuple[list[int], list[int]]] = []
    s = t = s0 = t0 = 0
    while s < len(student) and t < len(teacher):
        s_end, t_end = student[s][1], teacher[t][1]
        if s_end < t_end:
            s += 1
        elif t_end < s_end:
            t += 1
        else:
            s, t = s + 1, t + 1
            groups.append((list(range(s0, s)), list(range(t0, t))))
            s0, t0 = s, t
    if s0 < len(student) or t0 < len(teacher):
        groups.append((list(range(s0, len(student))), list(range(t0, len(teacher)))))
    return [(a, b) for a, b in groups if a and b]


def span_log_probs(log_probs: Tensor, targets: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """log p(span) = Σ of the realised tokens' log-probabilities within each span.

    ``log_probs`` ``[T, V]``: row k is the distribution of target token k (already shifted);
    ``targets`` ``[T]``; ``groups``: token positions per span. Returns ``[G]``."""
    token = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    index = torch.cat([torch.full((len(g),), i, dtype=torch.long) for i, g in enumerate(groups)])
    positions = torch.cat([torch.as_tensor(list(g), dtype=torch.long) for g in groups])
    out = token.new_zeros(len(groups))
    return out.index_add(0, index.to(token.device), token[positions.to(token.device)])


def merged_log_probs(
    log_probs: Tensor, targets: Tensor, groups: Sequence[Sequence[int]], strategy: str = "observed"
) -> Tensor:
    """One (unnormalised) log-distribution per span ``[G, V]``: GOLD's merge in log space.

    ``observed``: the first position's distribution + the log-probabilities of the span's
    later realised tokens; ``bayesian``: the last position's distribution + those of its
    earlier ones. A one-token span is that token's distribution."""
    if strategy not in ("observed", "bayesian"):
        raise ConfigError("merge_strategy", strategy, "use 'observed' or 'bayesian'")
    token = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    rows = []
    for g in groups:
        base, rest = (g[0], g[1:]) if strategy == "observed" else (g[-1], g[:-1])
        rows.append(log_probs[base] + token[list(rest)].sum() if rest else log_probs[base])
    return torch.stack(rows)


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[Tensor, Tensor]:
    """(student ids, teacher ids) of the tokens both vocabularies hold with the same string,
    sorted by teacher id (GOLD's hybrid-ULD map, gold_trainer.py L350-L380)."""
    s_vocab = student_tokenizer.get_vocab()
    pairs = sorted(
        (t_id, s_vocab[tok])
        for tok, t_id in teacher_tokenizer.get_vocab().items()
        if tok in s_vocab
    )
    return (
        torch.tensor([s for _, s in pairs], dtype=torch.long),
        torch.tensor([t for t, _ in pairs], dtype=torch.long),
    )


def aligned_span_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_targets: Tensor,
    teacher_targets: Tensor,
    student_mask: Tensor,
    teacher_mask: Tensor,
    student_tokenizer,
    teacher_tokenizer,
    loss: str = "uld",
    strategy: str = "observed",
    shared: tuple[Tensor, Tensor] | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """A token-level loss on the aligned spans of a batch tokenized twice.

    Logits ``[B, T, V]`` of each model on its own tokenization (shifted: position k predicts
    target k), targets and completion masks ``[B, T]``. Per sample, the two completions are
    aligned by bytes (``byte_spans``/``align_spans``), each model's distributions are merged
    per span (``merged_log_probs``), and ``loss`` compares them: ``uld`` (sorted L1, GOLD's
    extended ULD) or ``shared_kl`` (KL(teacher ‖ student) on the vocabulary both hold,
    ``shared`` = ``shared_vocabulary(...)``, each side renormalised there). Returns (sum over
    spans, number of spans), for the module's token accounting (spans are its tokens)."""
    spans = [
        (
            byte_spans(student_tokenizer, student_targets[b][student_mask[b]].tolist()),
            byte_spans(teacher_tokenizer, teacher_targets[b][teacher_mask[b]].tolist()),
        )
        for b in range(student_logits.shape[0])
    ]
    return aligned_span_loss_from_spans(
        student_logits,
        teacher_logits,
        student_targets,
        teacher_targets,
        student_mask,
        teacher_mask,
        spans,
        loss,
        strategy,
        shared,
        temperature,
    )


def aligned_span_loss_from_spans(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_targets: Tensor,
    teacher_targets: Tensor,
    student_mask: Tensor,
    teacher_mask: Tensor,
    spans: Sequence[tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]]],
    loss: str = "uld",
    strategy: str = "observed",
    shared: tuple[Tensor, Tensor] | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``aligned_span_loss`` with each sample's (student, teacher) completion byte spans
    given (``byte_spans`` of its masked targets), e.g. computed once by the DataModule."""
    from kd_lightning.losses.lm.divergences import forward_kl
    from kd_lightning.losses.lm.uld import sorted_l1

    if loss not in ("uld", "shared_kl"):
        raise ConfigError("loss", loss, "use 'uld' or 'shared_kl'")
    if loss == "shared_kl" and shared is None:
        raise ConfigError("shared", None, "shared_kl needs shared_vocabulary(student, teacher)")
    total, n_spans = student_logits.new_zeros(()), 0
    for b in range(student_logits.shape[0]):
        s_ids, t_ids = student_targets[b][student_mask[b]], teacher_targets[b][teacher_mask[b]]
        groups = align_spans(*spans[b])
        if not groups:
            continue
        s_lp = torch.log_softmax(student_logits[b][student_mask[b]].float() / temperature, -1)
        t_lp = torch.log_softmax(teacher_logits[b][teacher_mask[b]].float() / temperature, -1)
        s_m = merged_log_probs(s_lp, s_ids, [g for g, _ in groups], strategy)
        t_m = merged_log_probs(t_lp, t_ids, [g for _, g in groups], strategy)
        if loss == "uld":
            values = sorted_l1(s_m.exp(), t_m.exp())
        else:
            s_idx, t_idx = (x.to(s_m.device) for x in shared)
            values = forward_kl(s_m[:, s_idx], t_m[:, t_idx])
        total, n_spans = total + values.sum(), n_spans + len(groups)
    return total, torch.tensor(n_spans, device=student_logits.device)


def spans_from_byte_ends(byte_ends: Tensor, mask: Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) byte spans of the masked tokens from the DataModule's
    ``byte_ends`` (shifted like the targets: ``batch["byte_ends"][:, 1:]``)."""
    out = []
    for ends in (byte_ends[b][mask[b]].tolist() for b in range(len(mask))):
        out.append(list(zip([0, *ends[:-1]], ends)))
    return out


class AlignedSpanLoss(TokenHead):
    """ULD on byte-aligned spans of a student and a teacher of another tokenizer (TRL GOLD's
    extended ULD, ``use_extended_uld=True``), per span.

    ``LMDistillationModule`` runs the teacher on its own tokenization of each row; the data's
    ``byte_ends``/``teacher_byte_ends`` give each completion token's bytes, the two
    tokenizations are grouped into spans of the same bytes (``align_spans``), each side's
    distributions are merged per span (``merged_log_probs``, ``merge_strategy``) and compared
    by the sorted L1 (``aligned_span_loss_from_spans``). Returns the sum over spans; the
    module divides by the student's completion tokens (a span of k student tokens counts
    once), so the term is smaller than a per-token loss by the spans/tokens ratio.

    Args:
        temperature: divides both models' logits.
        merge_strategy: ``observed`` (GOLD's default) or ``bayesian``.
        weight, schedule, name: as every head's (``train/loss_aligned_uld``).
    """

    default_name = "aligned_uld"
    cross_tokenizer = True
    #: reads ``byte_ends``/``teacher_byte_ends``: the data needs a teacher tokenizer
    needs_byte_ends = True
    reference = (
        "huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 "
        "trl/experimental/gold/gold_trainer.py L528-L623"
    )

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        merge_strategy: str = "observed",
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        if merge_strategy not in ("observed", "bayesian"):
            raise ConfigError(
                "AlignedSpanLoss.merge_strategy", merge_strategy, "use observed or bayesian"
            )
        self.temperature = check_temperature("AlignedSpanLoss", temperature)
        self.merge_strategy = merge_strategy

    def forward(self, student: TokenOutput, teacher: TokenOutput, batch: dict) -> Tensor:
        if "byte_ends" not in batch or "teacher_byte_ends" not in batch:
            raise ConfigError(
                "model.heads",
                self.name,
                "AlignedSpanLoss reads the tokens' byte offsets: give the data "
                "teacher_tokenizer (or teacher_vocab_size)",
            )
        spans = list(
            zip(
                spans_from_byte_ends(batch["byte_ends"][:, 1:], student.mask),
                spans_from_byte_ends(batch["teacher_byte_ends"][:, 1:], teacher.mask),
            )
        )
        total, _ = aligned_span_loss_from_spans(
            student.logits,
            teacher.logits,
            student.targets,
            teacher.targets,
            student.mask,
            teacher.mask,
            spans,
            "uld",
            self.merge_strategy,
            None,
            self.temperature,
        )
        return total


__all__ = [
    "AlignedSpanLoss",
    "aligned_span_loss",
    "aligned_span_loss_from_spans",
    "align_spans",
    "byte_spans",
    "merged_log_probs",
    "shared_vocabulary",
    "span_log_probs",
    "spans_from_byte_ends",
    "token_bytes",
]
