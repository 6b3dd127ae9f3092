"""Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer" (CVPR)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead, match_spatial
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


class _Regressor(nn.Module):
    """VID's mean predictor μ(f_s) and per-channel variance σ² = softplus(α) + ε."""

    def __init__(self, s_channels: int, t_channels: int, init_var: float, eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
        )
        # softplus⁻¹(init_var - eps): the variance starts at init_var
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + self.eps


class VID(FeatureHead):
    """Variational information distillation: maximise a variational lower bound on the
    mutual information between student and teacher features, i.e. minimise the Gaussian
    negative log-likelihood of the teacher feature under a predicted mean and a learnt
    per-channel variance::

        loss = Σ_pairs mean_{n,c,h,w} ½ · ((μ(f_s) - f_t)² / σ_c² + log σ_c²)

    ``μ`` is three 1×1 convs (student → teacher channels, ReLU between), σ² = softplus(α)+ε.
    Spatial sizes are matched by average pooling the larger map. Regressors and α are head
    parameters (trained, checkpointed). Reference: RepDistiller ``VIDLoss`` (and mdistiller):
    init_pred_var 5, eps 1e-5, layers f1-f3 of CIFAR ResNets, weight 1 with CE 1.

    Args:
        init_var: initial variance σ² (5.0).
        eps: variance floor ε (1e-5).
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/VID.py L12-L54"
    )
    default_name = "vid"
    feature_ranks = (4,)

    def __init__(
        self, weight: float = 1.0, *, init_var: float = 5.0, eps: float = 1e-5, **kwargs: Any
    ) -> None:
        super().__init__(weight, **kwargs)
        if eps <= 0 or init_var <= eps:
            raise ConfigError("VID.init_var", init_var, f"use an initial variance > eps ({eps}) > 0")
        self.init_var, self.eps = float(init_var), float(eps)
        self.regressors = nn.ModuleList()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        self.regressors = nn.ModuleList(
            _Regressor(s[1], t[1], self.init_var, self.eps) for s, t in shapes
        )

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for reg, (f_s, f_t) in zip(self.regressors, self.pairs(student, teacher), strict=True):
            f_s, f_t = match_spatial(f_s, f_t)
            var = reg.variance().view(1, -1, 1, 1)
            total = total + (0.5 * ((reg.mean(f_s) - f_t).pow(2) / var + var.log())).mean()
        return total
