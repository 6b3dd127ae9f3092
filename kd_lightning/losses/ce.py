"""Hard-label cross-entropy, with optional label smoothing."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead, labelled
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


class CrossEntropy(LossHead):
    """CE between student logits and the labels. Unlabelled samples (label -1) are ignored.

    Args:
        label_smoothing: ε of label smoothing (Szegedy et al. 2016), in [0, 1).
    """

    default_name = "ce"
    uses_labels = True
    is_task_loss = True
    reference = (
        "standard formula: -Σ target · log softmax(z), averaged over the labelled samples, "
        "with label smoothing as Szegedy et al. 2016 §7 (torch.nn.functional.cross_entropy)"
    )
    departures = ()

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(weight, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError("CrossEntropy.label_smoothing", label_smoothing, "use 0 <= ε < 1")
        self.label_smoothing = label_smoothing

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        # ignore_index skips unlabelled rows inside the kernel (even non-finite ones); the
        # sum over the labelled count is their mean, and 0 with a graph when there are none
        total = F.cross_entropy(
            student.logits, batch["label"], ignore_index=-1, reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return total / labelled(batch).sum().clamp_min(1)
