"""Hard-label cross-entropy, with optional label smoothing."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead, labelled, masked_mean
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


class CrossEntropy(LossHead):
    """CE between student logits and the labels. Unlabelled samples (label -1) are ignored.

    Args:
        label_smoothing: ε of label smoothing (Szegedy et al. 2016), in [0, 1).
    """

    default_name = "ce"
    uses_labels = True

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(weight, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError("CrossEntropy.label_smoothing", label_smoothing, "use 0 <= ε < 1")
        self.label_smoothing = label_smoothing

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        mask = labelled(batch)
        per_sample = F.cross_entropy(
            student.logits,
            batch["label"].clamp_min(0),
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return masked_mean(per_sample, mask)
