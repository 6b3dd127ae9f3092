"""Per-token loss heads for causal-LM distillation, masked to completion tokens.

Each head returns the **sum** over the batch's completion tokens (``token_sum = True``);
``LMDistillationModule`` divides by the completion tokens of the whole accumulation window
across every rank, so the optimizer step sees the true per-token mean however the window
is split into micro-batches and processes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import LossHead, check_temperature
from kd_lightning.losses.lm.chunked import chunked_token_loss
from kd_lightning.losses.lm.divergences import DIVERGENCES
from kd_lightning.losses.outputs import TokenOutput
from kd_lightning.losses.schedules import Schedule

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, values.new_zeros(())).sum()


class TokenHead(LossHead):
    """A per-token head: ``forward(student, teacher, batch)`` with ``TokenOutput``s."""

    #: the value is a sum over completion tokens, normalised by the module
    token_sum = True
    #: whether it can run on the chunked path (``logits`` None)
    chunkable = False


class TokenDivergence(TokenHead):
    """A divergence between teacher and student next-token distributions per completion token.

    Args:
        divergence: ``forward_kl`` KL(teacher ‖ student), ``reverse_kl``, ``jsd`` (GKD's
            generalized JSD with ``beta``), ``skew_kl``/``skew_reverse_kl`` (DistiLLM,
            ``alpha``) or ``tvd``.
        temperature: divides both logits before the softmax.
        t_squared: multiply by T² (Hinton et al.'s gradient-scale correction); explicit,
            off by default as in TRL and DistiLLM.
        beta: the JSD's interpolation (0: forward KL, 1: reverse KL, TRL's convention).
        continuous: JSD divided by β(1 − β), continuous at β ∈ {0, 1}.
        alpha: the skew of ``skew_kl``/``skew_reverse_kl`` (DistiLLM's default 0.1).
    """

    default_name = "kd"
    chunkable = True
    reference = "huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 trl/experimental/gkd/gkd_trainer.py L239-L325"

    def __init__(
        self,
        weight: float = 1.0,
        divergence: Divergence = "forward_kl",
        temperature: float = 1.0,
        t_squared: bool = False,
        beta: float = 0.5,
        continuous: bool = False,
        alpha: float = 0.1,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name or divergence)
        if divergence not in DIVERGENCES:
            raise ConfigError(
                f"{type(self).__name__}.divergence", divergence, f"use one of {sorted(DIVERGENCES)}"
            )
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"{type(self).__name__}.beta", beta, "use a beta in [0, 1]")
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"{type(self).__name__}.alpha", alpha, "use an alpha in [0, 1)")
        self.divergence = divergence
        self.temperature = check_temperature(type(self).__name__, temperature)
        self.scale = self.temperature**2 if t_squared else 1.0
        fn = DIVERGENCES[divergence]
        kwargs = {"temperature": self.temperature}
        if divergence == "jsd":
            kwargs.update(beta=beta, continuous=continuous)
        elif divergence.startswith("skew"):
            kwargs["alpha"] = alpha
        self.fn = functools.partial(fn, **kwargs)

    def per_token(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        return self.fn(student, teacher) * self.scale

    def forward(self, student: TokenOutput, teacher: TokenOutput, batch: dict) -> Tensor:
        mask = student.mask
        if student.logits is None:
            return _chunked(
                self.per_token, student, teacher, mask, getattr(self, "chunk_size", 256)
            )
        vocab = min(student.logits.shape[-1], teacher.logits.shape[-1])
        s, t = student.logits[mask][:, :vocab], teacher.logits[mask][:, :vocab]
        return self.per_token(s, t).sum()


class TokenCrossEntropy(TokenHead):
    """Cross-entropy of the student on the completion's next tokens (the SFT term)."""

    default_name = "ce"
    chunkable = True
    is_task_loss = True

    def per_token(self, student: Tensor, teacher: Tensor | None, targets: Tensor) -> Tensor:
        return F.cross_entropy(
            student if student.dtype == torch.float64 else student.float(),
            targets,
            reduction="none",
        )

    def forward(self, student: TokenOutput, teacher: TokenOutput | None, batch: dict) -> Tensor:
        if student.logits is None:
            return _chunked(
                self.per_token, student, teacher, student.mask, getattr(self, "chunk_size", 256)
            )
        mask = student.mask
        return self.per_token(student.logits[mask], None, student.targets[mask]).sum()


class HiddenStateDistance(TokenHead):
    """MSE or cosine distance between mapped decoder hidden states, per completion token.

    Args:
        layers: ``[[student_layer, teacher_layer], ...]`` indices into ``hidden_states``
            (0: embeddings, -1: final); default the final states of both.
        distance: ``mse`` (mean over features) or ``cosine`` (1 − cos).
        student_dim, teacher_dim: widths; a learned linear projection maps the student's
            states to the teacher's width when they differ (student-side, in the optimizer).
    """

    default_name = "hidden"

    def __init__(
        self,
        weight: float = 1.0,
        layers: Sequence[Sequence[int]] = ((-1, -1),),
        distance: Literal["mse", "cosine"] = "mse",
        student_dim: int = 0,
        teacher_dim: int = 0,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        if distance not in ("mse", "cosine"):
            raise ConfigError("HiddenStateDistance.distance", distance, "use mse or cosine")
        self.layers = [tuple(int(i) for i in pair) for pair in layers]
        self.distance = distance
        self.proj = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim, bias=False)
            if student_dim and teacher_dim and student_dim != teacher_dim
            else nn.Identity()
            for _ in self.layers
        )

    def forward(self, student: TokenOutput, teacher: TokenOutput, batch: dict) -> Tensor:
        mask, total = student.mask, None
        for (i, j), proj in zip(self.layers, self.proj):
            s = proj(student.hidden_states[i][mask].float())
            t = teacher.hidden_states[j][mask].float()
            if s.shape[-1] != t.shape[-1]:
                raise ConfigError(
                    "HiddenStateDistance.student_dim",
                    s.shape[-1],
                    f"set student_dim and teacher_dim ({t.shape[-1]}) for a projection",
                )
            d = (
                ((s - t) ** 2).mean(-1)
                if self.distance == "mse"
                else 1 - F.cosine_similarity(s, t, -1)
            )
            total = d.sum() if total is None else total + d.sum()
        return total


def _chunked(
    per_token, student: TokenOutput, teacher: TokenOutput | None, mask: Tensor, chunk_size: int
) -> Tensor:
    s_hidden = student.hidden_states[-1][mask]
    if teacher is None:  # CE: a zero-width stand-in for the teacher
        t_hidden = s_hidden.new_zeros(s_hidden.shape[0], 1)
        t_weight = s_hidden.new_zeros(student.head_weight.shape[0], 1)
    else:
        t_hidden, t_weight = teacher.hidden_states[-1][mask], teacher.head_weight
    return chunked_token_loss(
        s_hidden,
        student.head_weight,
        t_hidden,
        t_weight,
        mask.new_ones(s_hidden.shape[0]),
        per_token,
        student.targets[mask],
        chunk_size=chunk_size,
    )
