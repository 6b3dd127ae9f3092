"""Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead, match_spatial
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def attention_map(f: Tensor, p: float) -> Tensor:
    """Spatial attention ``mean_c |f_c|^p``, flattened and L2-normalised per sample."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AttentionTransfer(FeatureHead):
    """Attention transfer: ``Σ_pairs mean((Q_s - Q_t)²)``, ``Q = normalize(mean_c |f|^p)``.

    Matches *where* each network looks: the channel-pooled activation energy of a
    feature map. Channel counts may differ; spatial sizes are matched by average
    pooling the larger map. The mean-squared form and the weight of 1000 are
    RepDistiller's (the paper writes β/2·‖Q_s − Q_t‖₂).

    Args:
        weight: RepDistiller uses 1000 on CIFAR-100.
        student_layers, teacher_layers: (N, C, H, W) layer pairs, e.g. ``[layer1, layer2, layer3]``.
        p: the exponent of the attention map (paper: 2).
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/AT.py L15-L29"
    )
    departures = (
        "the map is mean_c |f|^p (the paper's absolute value) where RepDistiller takes "
        "f^p: equal for even p such as the default 2",
    )
    default_name = "at"
    feature_ranks = (4,)

    def __init__(self, weight: float = 1000.0, *, p: float = 2.0, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        if p <= 0:
            raise ConfigError("AttentionTransfer.p", p, "use an exponent > 0 (the paper uses 2)")
        self.p = float(p)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for f_s, f_t in self.pairs(student, teacher):
            f_s, f_t = match_spatial(f_s, f_t)
            total = total + (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()
        return total
