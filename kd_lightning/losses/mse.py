"""Logit regression: Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?"."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import Batch, LossHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide


class LogitMSE(LossHead):
    """Mean squared error between student and teacher logits, ``mean((z_s - z_t)²)``.

    Averaged over samples *and* classes (``F.mse_loss``'s default). Matching logits is
    KD's limit of a high temperature (Hinton et al. 2015, §2.1), without the softmax.
    With several teachers the target is their weighted mean logit. Uses every sample,
    labelled or not.
    """

    default_name = "mse"
    reference = "standard formula: Ba & Caruana 2014 §2.2, 1/(N·C) Σ (z_s - z_t)²"
    departures = ()

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        return F.mse_loss(wide(student.logits), wide(teacher.logits))
