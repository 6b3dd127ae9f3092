"""What a loss head sees: the student's and the teacher(s)' outputs for one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def wide(x: Tensor) -> Tensor:
    """At least fp32: bf16/fp16 logits are upcast, float64 (the parity tests) stays."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class ModelOutput:
    """Logits plus the named feature maps that the configured heads asked for."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TeacherOutput:
    """One or more frozen teachers. Logit heads read the (weighted) ensemble.

    For a single teacher every method reduces to that teacher's own outputs.
    The ensemble of distributions is the weighted mean of *probabilities*, which is
    the standard way to average classifiers (it is not the softmax of mean logits).
    """

    members: list[ModelOutput]
    weights: list[float] | None = None

    def _w(self) -> list[float]:
        if self.weights is None:
            return [1.0 / len(self.members)] * len(self.members)
        total = sum(self.weights)
        return [w / total for w in self.weights]

    @property
    def logits(self) -> Tensor:
        """Weighted mean of the members' logits (used by logit-regression heads)."""
        if len(self.members) == 1:
            return self.members[0].logits
        return sum(w * wide(m.logits) for w, m in zip(self._w(), self.members))

    @property
    def features(self) -> dict[str, Tensor]:
        """The first teacher's features; heads pick another with ``member(i)``."""
        return self.members[0].features

    def member(self, index: int) -> ModelOutput:
        return self.members[index]

    def probs(self, temperature: float = 1.0) -> Tensor:
        """Ensemble soft targets at ``temperature``, in fp32 (float64 stays float64)."""
        return sum(
            w * F.softmax(wide(m.logits) / temperature, dim=1)
            for w, m in zip(self._w(), self.members)
        )

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        if len(self.members) == 1:  # exact log-softmax, no log(softmax) round trip
            return F.log_softmax(wide(self.members[0].logits) / temperature, dim=1)
        return torch.log(self.probs(temperature).clamp_min(1e-12))

    def argmax(self) -> Tensor:
        return self.probs().argmax(dim=1)


@dataclass
class TokenOutput:
    """A causal LM's outputs at the positions that predict a next token (already shifted:
    position t predicts ``targets[:, t]``), for the per-token heads of
    ``kd_lightning.losses.lm``.

    Attributes:
        logits: ``[B, T, V]``; None when the module runs the chunked loss, which rebuilds
            them chunk by chunk from ``hidden_states[-1]`` and ``head_weight``.
        mask: ``[B, T]`` bool, True where the target is a completion token (the loss mask).
        targets: ``[B, T]`` next-token ids (any value where ``mask`` is False).
        hidden_states: per layer ``[B, T, D]``: 0 the embeddings, -1 the final (normed)
            states that the LM head reads.
        head_weight: the LM head's ``[V, D]`` weight (its real vocabulary rows only).
    """

    logits: Tensor | None
    mask: Tensor
    targets: Tensor
    hidden_states: tuple[Tensor, ...] = ()
    head_weight: Tensor | None = None
