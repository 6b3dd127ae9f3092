"""Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def similarity(f: Tensor) -> Tensor:
    """The batch's (N, N) Gram matrix of flattened features, rows L2-normalised."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


class SimilarityPreserving(FeatureHead):
    """SP: ``Σ_pairs ‖G_s - G_t‖²_F / N²`` with ``G`` the row-normalised batch Gram matrix.

    Matches which samples of the batch the two networks find alike, so the feature
    shapes (channels, spatial size, even rank) may differ freely.

    Args:
        weight: RepDistiller uses 3000 on CIFAR-100 (on the last stage's output).
        student_layers, teacher_layers: layer pairs of any shape, e.g. ``layer3``.
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/SP.py L16-L30"
    )
    default_name = "sp"

    def __init__(self, weight: float = 3000.0, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for f_s, f_t in self.pairs(student, teacher):
            n = f_s.shape[0]
            total = total + (similarity(f_s) - similarity(f_t)).pow(2).sum() / (n * n)
        return total
