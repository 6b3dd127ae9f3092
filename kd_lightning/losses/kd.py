"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import Batch, LossHead, check_temperature
from kd_lightning.losses.logit_standardization import standardize, standardized_teacher
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide


class KLDivergence(LossHead):
    """Soft-target KD: ``T² · KL(p_T^teacher ‖ p_T^student)``, averaged over the batch.

    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015, §2).
    Uses every sample, labelled or not.

    Args:
        temperature: softening temperature T > 0 (RepDistiller/mdistiller use 4).
        logit_standardization: z-score both networks' logits per sample first (Sun et al.
            2024, see ``logit_standardization.py``; their CIFAR-100 recipe: T=2, weight 9).
    """

    default_name = "kd"
    reference = (
        "sunshangquan/logit-standardization-KD@f6e5aa5172bad618e801163c3385322eea673754 mdistiller/distillers/KD.py L7-L19 (logit_standardization off: "
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/KD.py L13-L17)"
    )
    departures = ()

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 4.0,
        logit_standardization: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        self.temperature = check_temperature("KLDivergence", temperature)
        self.logit_standardization = logit_standardization

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        t = self.temperature
        z_s = wide(student.logits)
        if self.logit_standardization:
            z_s, teacher = standardize(z_s), standardized_teacher(teacher)
        log_p_s = F.log_softmax(z_s / t, dim=1)
        log_p_t = teacher.log_probs(t)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * t * t
