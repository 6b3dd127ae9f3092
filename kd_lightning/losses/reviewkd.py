"""Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (CVPR), ReviewKD."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


class ABF(nn.Module):
    """Attention-based fusion: a 1×1 conv of this stage's student feature, fused with the
    (upsampled) residual from the deeper stage by two learnt spatial attention maps, then a
    3×3 conv to the teacher's width."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                    if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]
                ) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att is not None and residual is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def hcl(f_s: Tensor, f_t: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss: MSE at full resolution plus MSE of average-pooled
    pyramids (4×4, 2×2, 1×1 where smaller than the map), weights 1, ½, ¼, …, normalised."""
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for level in levels:
        if level >= f_s.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, level),
                                          F.adaptive_avg_pool2d(f_t, level))
        total += weight
    return loss / total


class ReviewKD(FeatureHead):
    """Knowledge review: each teacher stage is matched by a fusion of the student's
    *same and deeper* stages, built top-down with attention-based fusion (ABF)::

        y_n = ABF_n(x_n),   y_i = ABF_i(x_i, residual_{i+1})   (i = n-1 … 1)
        loss = Σ_i HCL(y_i, t_i)

    Layers are listed shallow to deep and pair by position, e.g. student ``[layer1, layer2,
    layer3, pool]`` with teacher ``[layer1.4.relu:input, …, pool]`` (pre-ReLU teacher stages,
    as in mdistiller; a flat layer such as ``pool`` is treated as a 1×1 map). The ABFs are
    head parameters (trained, checkpointed). Reference: mdistiller ``ReviewKD.py``: weight 1
    with CE 1, ramped in over 20 epochs (``LinearWarmup``), mid channels min(512, deepest
    student width); the paper's CIFAR-100 runs follow RepDistiller's 240-epoch recipe.

    Args:
        max_mid_channels: cap on the ABFs' inner width (512).
    """

    reference = (
        "dvlab-research/ReviewKD@cede6ea6387ae9b6127de0e561507177bf19c11e "
        "CIFAR-100/model/reviewkd.py L20-L86; "
        "megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259 "
        "mdistiller/distillers/ReviewKD.py L11-L144"
    )
    default_name = "reviewkd"
    feature_ranks = (2, 4)

    def __init__(self, weight: float = 1.0, *, max_mid_channels: int = 512, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.max_mid_channels = int(max_mid_channels)
        self.abfs = nn.ModuleList()
        self._out_sizes: list[tuple[int, int]] = []

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        s_shapes = [_as_map(s) for s, _ in shapes]
        t_shapes = [_as_map(t) for _, t in shapes]
        mid = min(self.max_mid_channels, s_shapes[-1][1])
        n = len(shapes)
        # abfs[i] serves pair i; the deepest one has nothing deeper to fuse
        self.abfs = nn.ModuleList(
            ABF(s[1], mid, t[1], fuse=i < n - 1) for i, (s, t) in enumerate(zip(s_shapes, t_shapes))
        )
        self._out_sizes = [(int(t[2]), int(t[3])) for t in t_shapes]

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        pairs = [(_map(f_s), _map(f_t)) for f_s, f_t in self.pairs(student, teacher)]
        total = student.logits.new_zeros(())
        residual: Tensor | None = None
        for i in reversed(range(len(pairs))):
            f_s, f_t = pairs[i]
            out, residual = self.abfs[i](f_s, residual, self._out_sizes[i])
            total = total + hcl(out, f_t)
        return total


def _as_map(shape: torch.Size) -> torch.Size:
    return shape if len(shape) == 4 else torch.Size([*shape, 1, 1])


def _map(f: Tensor) -> Tensor:
    return f if f.dim() == 4 else f[:, :, None, None]
