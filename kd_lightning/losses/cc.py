"""Peng et al. 2019, "Correlation Congruence for Knowledge Distillation" (ICCV), CC."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


class CorrelationCongruence(FeatureHead):
    """Correlation congruence: transfer the correlation *between samples*, not each sample.

    Both pre-logit embeddings are projected by a learnable linear layer to ``feat_dim``
    (``e_s``, ``e_t``; RepDistiller's ``LinearEmbed``, no normalisation); with ``Δ_i = |e_s,i - e_t,i|`` over a batch in order::

        loss = mean_i Σ_d Δ_i,d · Δ_{i+1},d

    the first-order Taylor form of the paper's kernel-correlation congruence that RepDistiller
    ships (``Correlation``, code shared by the authors). Both projections are head parameters
    (the teacher network itself stays frozen). Reference: RepDistiller, ``feat_dim`` 128,
    weight 0.02 with CE 1, on the pre-logit embedding.

    Args:
        feat_dim: embedding size (128).
        normalize: L2-normalise both embeddings first (kd-lightning's form before issue 20; a
            departure: the loss is ~20× smaller, and the reference weight 0.02 was tuned
            without it).
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 distiller_zoo/CC.py "
        "L7-L17, models/util.py L185-L194, train_student.py L211-L218"
    )
    departures = ("normalize=True L2-normalises both embeddings (default False, as RepDistiller)",)
    default_name = "cc"
    single_pair = True

    def __init__(
        self, weight: float = 0.02, *, feat_dim: int = 128, normalize: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(weight, **kwargs)
        self.normalize = bool(normalize)
        if feat_dim < 1:
            raise ConfigError("CorrelationCongruence.feat_dim", feat_dim, "use a size >= 1 (128)")
        self.feat_dim = int(feat_dim)
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        ((s, t),) = shapes
        self.embed_s = nn.Linear(int(torch.Size(s[1:]).numel()), self.feat_dim)
        self.embed_t = nn.Linear(int(torch.Size(t[1:]).numel()), self.feat_dim)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        ((f_s, f_t),) = self.pairs(student, teacher)
        e_s, e_t = self.embed_s(f_s.flatten(1)), self.embed_t(f_t.flatten(1))
        if self.normalize:
            e_s, e_t = F.normalize(e_s, dim=1), F.normalize(e_t, dim=1)
        delta = (e_s - e_t).abs()
        if len(delta) < 2:  # a single sample has no neighbour to correlate with
            return (delta * 0).sum()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
