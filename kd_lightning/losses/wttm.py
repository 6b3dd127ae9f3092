"""Zheng & Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching"
(ICLR), WTTM."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide


class WTTM(LossHead):
    """Weighted transformed teacher matching.

    Temperature scaling is dropped on the student side; the teacher's distribution is
    power-transformed instead (``p^γ`` renormalised equals softmax at T = 1/γ), and each
    sample is weighted by the power sum ``U_γ(p_t) = Σ_c p_t,c^γ``, which is large where the
    teacher is unsure::

        p̃_t = p_t^γ / U_γ(p_t),    loss = mean_i U_γ(p_t,i) · KL(p̃_t,i ‖ softmax(z_s,i))

    TTM is the same without ``U``. Reference: zkxufo/TTM ``distiller_zoo/wttm.py``; the
    README's example uses γ = 0.1 with a distillation weight of 45 (TTM, vgg13 → vgg8) and
    CE weight 1; the per-pair γ and β are in the paper's Appendix A.4. Uses every sample.

    Args:
        gamma: the power γ in (0, 1] (T = 1/γ).
        weighted: multiply each sample by ``U_γ`` (WTTM); ``false`` gives TTM.
    """

    default_name = "wttm"
    reference = (
        "zkxufo/TTM@fe457b33a71ba27536ec04fe3d32c5b04963522f distiller_zoo/wttm.py L13-L21 "
        "(weighted false: distiller_zoo/ttm.py L13-L21)"
    )
    departures = ()

    def __init__(
        self, weight: float = 1.0, gamma: float = 0.1, weighted: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(weight, **kwargs)
        if not 0 < gamma <= 1:
            raise ConfigError("WTTM.gamma", gamma, "use a power in (0, 1], i.e. T = 1/gamma >= 1")
        self.gamma = float(gamma)
        self.weighted = weighted

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        log_p_s = F.log_softmax(wide(student.logits), dim=1)
        # log p_t^γ = γ·log p_t; in log space a zero teacher probability stays finite
        log_pow = self.gamma * teacher.log_probs(1.0)
        log_u = torch.logsumexp(log_pow, dim=1)  # log U_γ
        log_q = log_pow - log_u[:, None]  # the transformed teacher p̃_t
        kl = (log_q.exp() * (log_q - log_p_s)).sum(dim=1)
        return (log_u.exp() * kl).mean() if self.weighted else kl.mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, weighted={self.weighted}"
