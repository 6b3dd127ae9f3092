"""Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning" (CVPR), FSP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """``G[n, a, b] = mean_hw top[n, a, h, w] · bottom[n, b, h, w]`` after pooling the larger
    map to the smaller one's size."""
    hb, ht = bottom.shape[2], top.shape[2]
    if hb > ht:
        bottom = F.adaptive_avg_pool2d(bottom, top.shape[2:])
    elif hb < ht:
        top = F.adaptive_avg_pool2d(top, bottom.shape[2:])
    return torch.einsum("nahw,nbhw->nab", top, bottom) / (top.shape[2] * top.shape[3])


class FSP(FeatureHead):
    """Flow of solution procedure: match the Gram-like "FSP" matrices between consecutive
    layers, ``loss = Σ_l mean((G_s^l - G_t^l)²)`` with ``G^l = FSP(layer_l, layer_{l+1})``.

    Needs ≥ 2 layer pairs, and equal student/teacher channel counts per pair (the matrices
    must have the same size). Reference: RepDistiller ``FSP`` (layers f0-f3, weight 50); there
    FSP is an initialisation method: 30 epochs of this loss alone, then CE alone — use
    ``EpochWindow`` schedules as for ``AB``.
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/FSP.py L19-L48"
    )
    default_name = "fsp"
    feature_ranks = (4,)

    def __init__(self, weight: float = 50.0, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        if len(self.layer_pairs) < 2:
            raise ConfigError("FSP.student_layers", list(self.student_layers),
                              "FSP relates consecutive layers: give at least two pairs")

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        for (s_name, t_name), (s, t) in zip(self.layer_pairs, shapes):
            if s[1] != t[1]:
                raise ConfigError(
                    "FSP.student_layers", s_name,
                    f"FSP matrices need equal widths: {s_name!r} has {s[1]} channels, the "
                    f"teacher's {t_name!r} {t[1]}; pair equal-width layers",
                )

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        pairs = self.pairs(student, teacher)
        total = student.logits.new_zeros(())
        for (s0, t0), (s1, t1) in zip(pairs[:-1], pairs[1:]):
            total = total + (fsp_matrix(s0, s1) - fsp_matrix(t0, t1)).pow(2).mean()
        return total
