"""Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def conditional_probabilities(f: Tensor, eps: float) -> Tensor:
    """p(j | i) from the cosine-similarity kernel ``(cos + 1) / 2``, rows summing to 1."""
    flat = F.normalize(f.flatten(1), dim=1, eps=eps)
    kernel = (flat @ flat.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


class PKT(FeatureHead):
    """PKT: ``mean_ij p_t(j|i)·log((p_t(j|i) + ε) / (p_s(j|i) + ε))`` per pair.

    Matches the probability distribution that each sample's neighbours have in
    feature space (a cosine kernel density), a KL between the two networks' affinity
    distributions. Dimensions may differ; features are flattened.

    Args:
        weight: RepDistiller uses 30000 on CIFAR-100 (on the pre-logit embedding).
        student_layers, teacher_layers: usually ``features``/``pool``.
        eps: ε of the log ratio (RepDistiller: 1e-7).
    """

    default_name = "pkt"

    def __init__(self, weight: float = 30000.0, *, eps: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        if eps <= 0:
            raise ConfigError("PKT.eps", eps, "use a small positive constant, e.g. 1e-7")
        self.eps = float(eps)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for f_s, f_t in self.pairs(student, teacher):
            p_s = conditional_probabilities(f_s, self.eps)
            p_t = conditional_probabilities(f_t, self.eps)
            total = total + (p_t * ((p_t + self.eps) / (p_s + self.eps)).log()).mean()
        return total
