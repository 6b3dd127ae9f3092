"""Park et al. 2019, "Relational Knowledge Distillation" (CVPR)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of ``e``, with an exact zero diagonal.

    The clamp keeps ``sqrt`` differentiable where two embeddings coincide.
    """
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def normalised_distances(e: Tensor) -> Tensor:
    """Distances divided by their mean over distinct pairs (RKD's scale invariance)."""
    d = pairwise_distances(e)
    mean = d.sum() / (d > 0).sum().clamp_min(1)  # the diagonal zeros do not count
    return d / mean.clamp_min(1e-12)  # a batch of one gives zeros, not NaN


def angles(e: Tensor) -> Tensor:
    """cos∠(e_i, e_j, e_k) for all triplets: the (N, N, N) cosines at vertex e_j."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # diff[j, i] = e_i - e_j
    return diff @ diff.transpose(1, 2)


class RKD(FeatureHead):
    """RKD-D + RKD-A: ``w_d·Huber(ψ_D^s, ψ_D^t) + w_a·Huber(ψ_A^s, ψ_A^t)`` per pair.

    Matches the *structure* of the batch in embedding space: pairwise distances
    (normalised by their mean) and the angles formed by every triplet. Features are
    flattened, so any shapes work; the angle term costs O(N³·D) per batch.

    Args:
        weight: overall weight (RepDistiller: 1, with the inner weights below).
        student_layers, teacher_layers: usually the pre-logit embeddings (``features``,
            ``pool``).
        distance_weight: w_d (paper: 25).
        angle_weight: w_a (paper: 50).
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/RKD.py L15-L58"
    )
    default_name = "rkd"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        for field, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if value < 0:
                raise ConfigError(f"RKD.{field}", value, "use a weight >= 0 (paper: 25 and 50)")
        if distance_weight == 0 and angle_weight == 0:
            raise ConfigError("RKD.angle_weight", 0, "distance_weight and angle_weight are both 0")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for f_s, f_t in self.pairs(student, teacher):
            e_s, e_t = f_s.flatten(1), f_t.flatten(1)
            if self.distance_weight:
                loss_d = F.smooth_l1_loss(normalised_distances(e_s), normalised_distances(e_t))
                total = total + self.distance_weight * loss_d
            if self.angle_weight:
                total = total + self.angle_weight * F.smooth_l1_loss(angles(e_s), angles(e_t))
        return total
