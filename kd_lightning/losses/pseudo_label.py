"""Pseudo-label CE: Lee 2013, "Pseudo-Label"; the confidence threshold follows
FixMatch (Sohn et al. 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide
from kd_lightning.losses.schedules import Schedule


class PseudoLabel(LossHead):
    """Cross-entropy against the teacher's argmax ("hard distillation").

    ``loss = 1/N Σᵢ 1[max p_t(xᵢ) ≥ τ] · CE(z_s(xᵢ), argmax p_t(xᵢ))``

    Samples the teacher is less sure of than ``threshold`` contribute zero; the sum is
    divided by the *batch* size, as in FixMatch, so the term shrinks when few
    predictions are confident. Uses every sample, labelled or not: the ground truth is
    never read. With several teachers the label is the ensemble's argmax.

    Args:
        threshold: τ in [0, 1); 0 keeps every pseudo-label (FixMatch uses 0.95).
    """

    default_name = "pseudo_label"
    reference = (
        "standard formula: Lee 2013 pseudo-labels with FixMatch's confidence mask "
        "(Sohn et al. 2020, eq. 4): 1/N Σ 1[max p_t ≥ τ] · CE(z_s, argmax p_t)"
    )
    departures = ()

    def __init__(
        self,
        weight: float = 1.0,
        threshold: float = 0.0,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        if not 0.0 <= threshold < 1.0:
            raise ConfigError("PseudoLabel.threshold", threshold, "use a confidence in [0, 1), e.g. 0.95")
        self.threshold = float(threshold)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        confidence, target = teacher.probs().max(dim=1)
        per_sample = F.cross_entropy(wide(student.logits), target, reduction="none")
        if self.threshold > 0:
            per_sample = per_sample * (confidence >= self.threshold)
        return per_sample.mean()
