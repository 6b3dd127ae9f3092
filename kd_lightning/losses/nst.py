"""Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (arXiv:1707.01219)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead, match_spatial
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """k(x, y) = (xᵀy)² between every channel of ``a`` (N, Ca, HW) and of ``b`` (N, Cb, HW)."""
    return (a @ b.transpose(1, 2)).pow(2)


class NST(FeatureHead):
    """NST: squared MMD, polynomial kernel (d=2, c=0), between the channels' spatial
    activation patterns: ``mean k(s, s') + mean k(t, t') - 2·mean k(s, t)`` per pair.

    Each channel's (L2-normalised) activation map over positions is one sample of a
    network's "neuron selectivity"; NST matches the two distributions of those maps.
    Channel counts may differ; spatial sizes are matched by average pooling.

    Args:
        weight: RepDistiller uses 50 on CIFAR-100.
        student_layers, teacher_layers: (N, C, H, W) layer pairs, e.g. ``[layer1, layer2, layer3]``.
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/NST.py L16-L42"
    )
    default_name = "nst"
    feature_ranks = (4,)

    def __init__(self, weight: float = 50.0, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for f_s, f_t in self.pairs(student, teacher):
            f_s, f_t = match_spatial(f_s, f_t)
            s = F.normalize(f_s.flatten(2), dim=2)
            t = F.normalize(f_t.flatten(2), dim=2)
            mmd = (
                _poly_kernel(t, t).mean() + _poly_kernel(s, s).mean() - 2 * _poly_kernel(s, t).mean()
            )
            total = total + mmd
        return total
