"""Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (NeurIPS), DIST."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead, check_temperature
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide

#: the reference's guard on the product of norms
EPS = 1e-8


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation: cosine of the mean-centred rows. A constant row has no
    direction and correlates 0 with anything (its centred norm is 0, guarded by ``EPS``)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


class DIST(LossHead):
    """DIST: match *relations* of predictions rather than the predictions themselves.

    With ``Y_s, Y_t`` the (N, C) softmax outputs at temperature τ and ρ the Pearson
    correlation::

        inter = 1 - mean_i ρ(Y_s[i, :], Y_t[i, :])      (each sample's class ranking)
        intra = 1 - mean_c ρ(Y_s[:, c], Y_t[:, c])      (each class across the batch)
        loss  = τ² · (β · inter + γ · intra)

    Correlation is invariant to shifts and scales, so a student need not reproduce a much
    stronger teacher's exact probabilities. Reference: hunto/DIST_KD (``DIST`` loss; defaults
    β = γ = 1, τ = 1 on ImageNet; the paper's CIFAR-100 runs use β = γ = 2, τ = 4 with
    CE weight 1). Uses every sample, labelled or not.

    Args:
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature: τ > 0.
    """

    default_name = "dist"
    reference = (
        "hunto/image_classification_sota@6f7a70a1dd57fd88413d83909d3d53243068f701 "
        "lib/models/losses/dist_kd.py L4-L34 (the classification code of hunto/DIST_KD)"
    )
    departures = ()

    def __init__(
        self,
        weight: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        for field, value in (("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ConfigError(f"DIST.{field}", value, "use a weight >= 0 (paper: 1 on ImageNet)")
        self.beta, self.gamma = float(beta), float(gamma)
        self.temperature = check_temperature("DIST", temperature)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        t = self.temperature
        y_s = (wide(student.logits) / t).softmax(dim=1)
        y_t = teacher.probs(t)
        inter = 1 - pearson(y_s, y_t).mean()
        intra = 1 - pearson(y_s.T, y_t.T).mean()
        return t * t * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, T={self.temperature}"
