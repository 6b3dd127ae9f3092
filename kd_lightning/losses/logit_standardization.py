"""Sun et al. 2024, "Logit Standardization in Knowledge Distillation" (CVPR).

A switch (``logit_standardization: true``) on ``KLDivergence``, ``DKD`` and ``MLKD``, not a
head of its own: each sample's student and teacher logits are z-scored before the
temperature softmax,

    Z(z) = (z - mean(z)) / (std(z) + 1e-7)        (std with Bessel's correction, as torch.std)

so the student matches the teacher's logit *relations* rather than their range. With it the
temperature becomes a shared base temperature (the reference repo,
sunshangquan/logit-standardization-KD, uses T=2 and a KD weight of 9 on CIFAR-100).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide

#: the reference's additive guard on the standard deviation
EPS = 1e-7


def standardize(logits: Tensor) -> Tensor:
    """Z-score each row. A constant row maps to zeros (uniform softmax) with finite
    gradients: ``std``'s own gradient is undefined at zero variance, so the square root
    is taken only where the variance is positive."""
    var = logits.var(dim=-1, keepdim=True)
    positive = var > 0
    std = torch.where(positive, var, torch.ones_like(var)).sqrt() * positive
    return (logits - logits.mean(dim=-1, keepdim=True)) / (std + EPS)


def standardized_teacher(teacher: TeacherOutput) -> TeacherOutput:
    """Every member's logits standardised (an ensemble then averages their soft targets)."""
    return TeacherOutput([ModelOutput(standardize(wide(m.logits)), m.features)
                          for m in teacher.members], teacher.weights)
