"""Li et al. 2023, "Curriculum Temperature for Knowledge Distillation" (AAAI), CTKD."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-scale`` (Ganin & Lempitsky)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


class CTKD(LossHead):
    """KD whose temperature is learnt adversarially, with a curriculum on its strength.

    The head owns one parameter θ (the global-temperature variant); the temperature is
    ``T = t_min + t_range · sigmoid(θ)`` and the loss is Hinton's ``T² · KL(p_T^t ‖ p_T^s)``.
    θ reaches the loss through a gradient-reversal layer of strength λ, so while the student
    descends the KD loss the temperature *ascends* it, making the task progressively harder.
    λ follows a cosine curriculum from 0 to ``lambda_max`` over ``lambda_epochs``::

        λ(e) = lambda_max · (1 - cos(π · min(e + o, E) / E)) / 2

    with ``e`` Lightning's 0-based epoch and ``o = epoch_offset``: CTKD's ``train_student.py``
    calls ``CosineDecay.get_value(epoch)`` with 1-based epochs, so its first epoch already has
    λ = 0.0245 and its tenth λ = 1 (``o = 1``, the default).

    θ is an ``nn.Parameter`` of the head, so the DistillationModule's optimizer trains it and
    the checkpoint saves it (``heads.<i>.theta``). Reference: zhengli97/CTKD (``Global_T``,
    ``CosineDecay(max_value=0, min_value=-1, num_loops=10)``, ``t_start=1``, ``t_end=20``, θ
    initialised to 1, so T starts at 1 + 20·sigmoid(1) ≈ 15.6); CIFAR-100 runs on top of KD
    with CE 0.1 / KD 0.9 (RepDistiller's recipe). Uses every sample.

    Args:
        t_min: the lowest temperature.
        t_range: the temperature span: T ∈ (t_min, t_min + t_range).
        theta_init: the initial θ (reference: 1.0).
        lambda_max: the final gradient-reversal strength (reference: 1).
        lambda_epochs: epochs of the cosine ramp of λ (reference: 10 of 240).
        epoch_offset: added to the 0-based epoch before the curriculum reads it (reference:
            1, its epochs count from 1; 0 reproduces kd-lightning's earlier one-epoch lag).
    """

    reference = (
        "zhengli97/CTKD@7d5252241259ae70d38a832371fed9697d15fc14 train_student.py L186-L202, "
        "L402-L421; models/temp_global.py L9-L43; helper/loops.py L132-L141; "
        "distiller_zoo/KD.py L13-L20"
    )
    departures = (
        "epoch_offset: 0 starts the λ curriculum one epoch late (λ = 0 in the first epoch); "
        "the default 1 is the reference's 1-based epoch",
    )

    default_name = "ctkd"

    def __init__(
        self,
        weight: float = 1.0,
        t_min: float = 1.0,
        t_range: float = 20.0,
        theta_init: float = 1.0,
        lambda_max: float = 1.0,
        lambda_epochs: int = 10,
        epoch_offset: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        checks = (
            ("t_min", t_min, t_min > 0, "use a lowest temperature > 0 (reference: 1)"),
            ("t_range", t_range, t_range > 0, "use a temperature span > 0 (reference: 20)"),
            ("lambda_max", lambda_max, lambda_max >= 0, "use a reversal strength >= 0 (1)"),
            ("lambda_epochs", lambda_epochs, lambda_epochs >= 1, "use >= 1 epoch (reference: 10)"),
            ("epoch_offset", epoch_offset, epoch_offset in (0, 1),
             "use 1 (the reference's 1-based epochs) or 0"),
        )
        for field, value, ok, fix in checks:
            if not ok:
                raise ConfigError(f"CTKD.{field}", value, fix)
        self.t_min, self.t_range = float(t_min), float(t_range)
        self.lambda_max, self.lambda_epochs = float(lambda_max), int(lambda_epochs)
        self.epoch_offset = int(epoch_offset)
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))

    def reversal_strength(self, epoch: int) -> float:
        """λ at the 0-based ``epoch``: the cosine curriculum (``CosineDecay(0, -1, E)`` of
        the reference, negated: ``_ReverseGrad`` applies the sign)."""
        e = min(max(epoch + self.epoch_offset, 0), self.lambda_epochs)
        return self.lambda_max * (1 - math.cos(math.pi * e / self.lambda_epochs)) / 2

    def temperature(self, theta: Tensor | None = None) -> Tensor:
        return self.t_min + self.t_range * torch.sigmoid(self.theta if theta is None else theta)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        theta = _ReverseGrad.apply(wide(self.theta), self.reversal_strength(self.epoch))
        t = self.temperature(theta)
        log_p_s = F.log_softmax(wide(student.logits) / t, dim=1)
        log_p_t = teacher.log_probs(t)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, T={self.temperature().item():.3f}"
