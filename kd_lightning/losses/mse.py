"""Logit regression: Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?"."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import Batch, LossHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


class LogitMSE(LossHead):
    """Mean squared error between student and teacher logits, ``mean((z_s - z_t)²)``.

    Averaged over samples *and* classes (``F.mse_loss``'s default). Matching logits is
    KD's limit of a high temperature (Hinton et al. 2015, §2.1), without the softmax.
    With several teachers the target is their weighted mean logit. Uses every sample,
    labelled or not.
    """

    default_name = "mse"

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        return F.mse_loss(student.logits.float(), teacher.logits.float())
