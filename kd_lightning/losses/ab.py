"""Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed
by Hidden Neurons" (AAAI), AB."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead, check_init, he_init_
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
    ``kd_lightning.modules.features``), a connector maps each student layer onto the teacher's
    shape: none where channels and spatial size already match (RepDistiller ``Connector``, the
    AB authors' ``Active_Soft_WRN_norelu``), otherwise RepDistiller's ``ConvReg`` without ReLU
    (a 1×1 conv + BN for equal spatial sizes, see ``Connector``) with the AB authors' init,
    conv ~ N(0, √(2/n)), BN γ = 1, β = 0; with ``r = connector(f_s)``::

        loss = Σ_i w_i · Σ [ (r+m)²·1[r > -m, t ≤ 0] + (r-m)²·1[r ≤ m, t > 0] ] / N · 3/1000

    with ``w_i = 2^(i-n+1)`` (the deepest pair weighs 1) and margin m = 1. Reference:
    RepDistiller ``ABLoss`` (its ``/ 1000 * 3`` scale included) on pre-activation f1-f3; there
    AB is an *initialisation* method: 30 epochs of this loss alone, then CE alone. Express that
    with schedules: ``EpochWindow(stop: 30)`` on this head and ``EpochWindow(start: 30)`` on
    ``CrossEntropy`` (see ``configs/repro/cifar100/resnet32x4_resnet8x4/ab.yaml``).

    Args:
        margin: m (1.0).
        connector: ``auto`` (none where the shapes match, as the authors) or ``always``
            (a trained connector on every pair, kd-lightning's form before issue 20).
        init: the connector init: ``he`` (the authors') or ``default`` (PyTorch's).
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 distiller_zoo/AB.py "
        "L7-L29, models/util.py L65-L90; bhheo/AB_distillation@"
        "a7701d3506e13da87bda75aba1cee6397408144f models/distillation_module.py L16-L41"
    )
    departures = (
        "connector='always' inserts a trained connector even where the shapes match "
        "(default 'auto': none, as the authors)",
        "init='default' keeps PyTorch's connector init (default 'he': N(0, sqrt(2/n)), as the "
        "AB authors; RepDistiller's ConvReg keeps PyTorch's)",
    )
    default_name = "ab"
    feature_ranks = (4,)

    def __init__(
        self, weight: float = 1.0, *, margin: float = 1.0, connector: str = "auto",
        init: str = "he", **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        if margin < 0:
            raise ConfigError("AB.margin", margin, "use a margin >= 0 (paper: 1)")
        if connector not in ("auto", "always"):
            raise ConfigError("AB.connector", connector,
                              "use 'auto' (none where shapes match, as the authors) or 'always'")
        self.margin, self.connector, self.init = float(margin), connector, check_init("AB", init)
        self.connectors = nn.ModuleList()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        connectors: list[nn.Module] = []
        for s, t in shapes:
            if self.connector == "auto" and s[1:] == t[1:]:
                connectors.append(nn.Identity())
                continue
            conn = Connector(s, t, relu=False)
            connectors.append(he_init_(conn) if self.init == "he" else conn)
        self.connectors = nn.ModuleList(connectors)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        pairs = self.pairs(student, teacher)
        n = len(pairs)
        total = student.logits.new_zeros(())
        for i, (conn, (f_s, f_t)) in enumerate(zip(self.connectors, pairs, strict=True)):
            w = 2.0 ** (i - n + 1)
            total = total + w * boundary_loss(conn(f_s), f_t, self.margin) / f_s.shape[0]
        return total / 1000 * 3
