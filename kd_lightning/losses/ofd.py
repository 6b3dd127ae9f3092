"""Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV), OFD."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead, check_init, he_init_
from kd_lightning.losses.fitnet import Connector
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def partial_l2(s: Tensor, t: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2 against the margin-ReLU'd teacher: no penalty where both the student
    and the teacher are below the margin (the ReLU would discard the difference anyway);
    summed over (C, H, W), averaged over the batch."""
    loss = (
        (s - margin).pow(2) * ((s > margin) & (t <= margin))
        + (s - t).pow(2) * ((s > t) & (t > margin) & (t <= 0))
        + (s - t).pow(2) * (t > 0)
    )
    return loss.sum() / s.shape[0]


class OFD(FeatureHead):
    """Overhaul of feature distillation: distil *pre-ReLU* features through a connector,
    with the teacher's negative responses replaced by a per-channel margin.

    Tap pre-activation features with ``:input`` on each block's final ReLU (e.g. resnet8x4
    ``layer3.0.relu:input``; see ``kd_lightning.modules.features``). With ``r = connector(f_s)``
    (a bias-free 1×1 conv + BN to the teacher's width, no resizing, initialised as the
    authors: conv ~ N(0, √(2/n)), BN γ = 1, β = 0) and the teacher map average-pooled to the
    student's size (mdistiller; the authors' CIFAR code needs equal sizes)::

        loss = Σ_i partial_L2(r_i, t_i, m_i) / 2^(n-1-i)

    The margin ``m_c = E[t_c | t_c < 0]`` is the expected negative response of each teacher
    channel. The paper computes it from the preceding BatchNorm's γ, β under a Gaussian
    assumption; since heads see features, not the teacher's modules, this head estimates the
    same expectation from the teacher's pre-ReLU features themselves: a running mean over
    all training batches seen (the teacher is frozen, so it converges to the true value),
    kept in buffers and checkpointed. Reference: mdistiller ``OFD.py``: weight 1e-3 with CE 1,
    pre-activation f1-f3, connector kernel 1.

    Args:
        init: the connector init: ``he`` (the authors') or ``default`` (PyTorch's).
    """

    reference = (
        "clovaai/overhaul-distillation@76344a84a7ce23c894f41a2e05b866c9b73fd85a "
        "CIFAR-100/distiller.py L9-L72; megvii-research/mdistiller@"
        "a08d46f10d6102bd6e3f258ca5ac880b020ea259 mdistiller/distillers/OFD.py L11-L161"
    )
    departures = (
        "the margin E[t | t < 0] is a running estimate from the teacher's pre-ReLU features, "
        "where the authors derive it from the preceding BatchNorm's gamma and beta",
        "init='default' keeps PyTorch's connector init (default 'he', as the authors)",
    )
    default_name = "ofd"
    feature_ranks = (4,)

    def __init__(self, weight: float = 1e-3, *, init: str = "he", **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.init = check_init("OFD", init)
        self.connectors = nn.ModuleList()
        self.n_pairs = len(self.layer_pairs)
        for i in range(self.n_pairs):  # running sums of negative responses, per channel
            self.register_buffer(f"neg_sum_{i}", torch.zeros(0), persistent=True)
            self.register_buffer(f"neg_count_{i}", torch.zeros(0), persistent=True)

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        # a 1×1 conv that keeps the student's size: the teacher map is pooled to it (mdistiller)
        connectors = [Connector(s, t, relu=False, resize="none") for s, t in shapes]
        if self.init == "he":
            connectors = [he_init_(c) for c in connectors]
        self.connectors = nn.ModuleList(connectors)
        for i, (_, t) in enumerate(shapes):
            setattr(self, f"neg_sum_{i}", torch.zeros(t[1]))
            setattr(self, f"neg_count_{i}", torch.zeros(t[1]))

    def margin(self, i: int) -> Tensor:
        """The current estimate of each channel's E[t | t < 0] (0 before any negative)."""
        total, count = getattr(self, f"neg_sum_{i}"), getattr(self, f"neg_count_{i}")
        return total / count.clamp_min(1)

    @torch.no_grad()
    def _observe(self, i: int, f_t: Tensor) -> None:
        total = getattr(self, f"neg_sum_{i}")
        # summed in the buffer's precision (float32 unless the head is cast), never in fp16
        neg = f_t.clamp_max(0).to(total.dtype)
        total.add_(neg.sum(dim=(0, 2, 3)))
        getattr(self, f"neg_count_{i}").add_((f_t < 0).sum(dim=(0, 2, 3)).float())

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros(())
        for i, (conn, (f_s, f_t)) in enumerate(zip(self.connectors, self.pairs(student, teacher),
                                                   strict=True)):
            if self.training:
                self._observe(i, f_t)
            r = conn(f_s)
            t = F.adaptive_avg_pool2d(f_t, r.shape[-2:]) if f_t.shape[-2:] != r.shape[-2:] else f_t
            m = self.margin(i).to(t.dtype).view(1, -1, 1, 1)
            total = total + partial_l2(r, t, m) / 2 ** (self.n_pairs - 1 - i)
        return total
