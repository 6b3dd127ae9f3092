"""Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed
by Hidden Neurons" (AAAI), AB."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.fitnet import Connector
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def boundary_loss(s: Tensor, t: Tensor, margin: float) -> Tensor:
    """AB's alternative hinge: push each student pre-activation to the teacher's side of
    zero by ``margin``, summed over all elements."""
    on = t > 0
    loss = (s + margin).pow(2) * ((s > -margin) & ~on) + (s - margin).pow(2) * ((s <= margin) & on)
    return loss.sum()


class AB(FeatureHead):
    """Activation-boundary transfer: the student learns *which neurons fire*, not how much.

    On pre-ReLU features (tap them with ``:input`` on the block's ReLU, see
    ``kd_lightning.modules.features``), a 1×1 conv + BN connector maps each student layer to
    the teacher's width; with ``r = connector(f_s)``::

        loss = Σ_i w_i · Σ [ (r+m)²·1[r > -m, t ≤ 0] + (r-m)²·1[r ≤ m, t > 0] ] / N · 3/1000

    with ``w_i = 2^(i-n+1)`` (the deepest pair weighs 1) and margin m = 1. Reference:
    RepDistiller ``ABLoss`` (its ``/ 1000 * 3`` scale included) on pre-activation f1-f3; there
    AB is an *initialisation* method: 30 epochs of this loss alone, then CE alone. Express that
    with schedules: ``EpochWindow(stop: 30)`` on this head and ``EpochWindow(start: 30)`` on
    ``CrossEntropy`` (see ``configs/repro/cifar100/resnet32x4_resnet8x4/ab.yaml``).

    Args:
        margin: m (1.0).
    """

    default_name = "ab"
    feature_ranks = (4,)

    def __init__(self, weight: float = 1.0, *, margin: float = 1.0, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        if margin < 0:
            raise ConfigError("AB.margin", margin, "use a margin >= 0 (paper: 1)")
        self.margin = float(margin)
        self.connectors = nn.ModuleList()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        self.connectors = nn.ModuleList(Connector(s, t, relu=False) for s, t in shapes)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        pairs = self.pairs(student, teacher)
        n = len(pairs)
        total = student.logits.new_zeros(())
        for i, (conn, (f_s, f_t)) in enumerate(zip(self.connectors, pairs, strict=True)):
            w = 2.0 ** (i - n + 1)
            total = total + w * boundary_loss(conn(f_s), f_t, self.margin) / f_s.shape[0]
        return total / 1000 * 3
