"""Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def conditional_probabilities(f: Tensor, eps: float) -> Tensor:
    """p(j | i) from the cosine-similarity kernel ``(cos + 1) / 2``, rows summing to 1.

    Rows are divided by ``‖f‖ + ε`` as in RepDistiller (not by ``max(‖f‖, ε)``: the two
    differ in the gradient's radial part). The squared norm is floored at the dtype's
    smallest normal number, which changes no nonzero row but keeps a zero row's (a dead
    post-ReLU embedding) gradient 0 rather than NaN."""
    flat = f.flatten(1)
    sq = flat.pow(2).sum(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    flat = flat / (sq.sqrt() + eps)
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

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 distiller_zoo/PKT.py "
        "L16-L42"
    )
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
