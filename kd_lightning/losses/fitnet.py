"""Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (ICLR)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput

#: how a 4-D connector maps a student map onto a teacher map of another spatial size
RESIZES = ("conv", "interpolate", "none")


class Connector(nn.Module):
    """Maps a student feature onto the shape of a teacher feature (the FitNets regressor).

    * (N, C, H, W) → (N, C', H', W'), ``resize="conv"`` (default): RepDistiller's ``ConvReg``
      (HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 models/util.py
      L131-L154): a 3×3 stride-2 conv when H = 2H', a 4×4 stride-2 transposed conv when
      2H = H', a (1+H-H')×(1+W-W') valid conv when H ≥ H' (1×1 for equal sizes), each with a
      bias, then BatchNorm. A student map smaller than the teacher's by another ratio, which
      RepDistiller rejects, is upsampled bilinearly, then a 1×1 conv.
    * ``resize="interpolate"``: average pooling when the student map is larger, bilinear
      upsampling when it is smaller, then a bias-free 1×1 conv and BatchNorm (kd-lightning's
      form before issue 20; it departs from RepDistiller for unequal spatial sizes).
    * ``resize="none"``: a bias-free 1×1 conv and BatchNorm, the map keeps its size (OFD).
    * (N, D) → (N, D'): a linear layer.
    * (N, C, H, W) → (N, D'): global average pooling, then a linear layer.

    ``relu`` appends a ReLU, as RepDistiller does: block outputs are post-activation.
    """

    def __init__(
        self, s_shape: torch.Size, t_shape: torch.Size, relu: bool = True, resize: str = "conv"
    ) -> None:
        super().__init__()
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, not {resize!r}")
        self.size: tuple[int, int] | None = None
        self.pool = False
        if len(s_shape) == 4 and len(t_shape) == 4:
            (s_c, s_h, s_w), (t_c, t_h, t_w) = (tuple(int(v) for v in x[1:]) for x in (s_shape, t_shape))
            conv: nn.Module
            if resize == "conv" and s_h == 2 * t_h:
                conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            elif resize == "conv" and 2 * s_h == t_h:
                conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            elif resize == "conv" and s_h >= t_h and s_w >= t_w:
                conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
            else:
                conv = nn.Conv2d(s_c, t_c, kernel_size=1, bias=False)
                if resize != "none":  # "interpolate", or a ratio ConvReg has no conv for
                    self.size = (t_h, t_w)
            self.proj: nn.Module = nn.Sequential(conv, nn.BatchNorm2d(t_c))
        elif len(t_shape) == 2 and len(s_shape) in (2, 4):
            # no BatchNorm1d: it fails on a last batch of one sample
            self.pool = len(s_shape) == 4
            self.proj = nn.Linear(s_shape[1], t_shape[1])
        else:
            raise ValueError(f"cannot map a student feature {tuple(s_shape)} onto {tuple(t_shape)}")
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.pool:
            x = x.mean(dim=(2, 3))
        elif self.size is not None and x.shape[-2:] != self.size:
            h, w = x.shape[-2:]
            if h >= self.size[0] and w >= self.size[1]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.act(self.proj(x))


class FitNet(FeatureHead):
    """Hint loss: ``Σ_pairs mean((r(f_s) - f_t)²)`` with a learnable connector ``r``.

    One connector per layer pair is sized from a dummy forward (see ``Connector``); it
    is a student-side module, so it trains with the student and is saved in the
    checkpoint. Training is joint (hint + CE in one stage), as in RepDistiller and
    mdistiller, rather than the paper's two-stage schedule.

    Args:
        weight: RepDistiller and mdistiller use 100 on CIFAR-100.
        student_layers, teacher_layers: the hint/guided layer pairs, e.g. ``layer2``.
        relu: end each connector with a ReLU (for post-activation teacher features).
        resize: how a connector meets a teacher map of another spatial size: ``conv``
            (RepDistiller's ``ConvReg``: strided, transposed or valid conv) or
            ``interpolate`` (pool/upsample, then 1×1; a departure), see ``Connector``.
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "distiller_zoo/FitNet.py L6-L14, models/util.py L131-L154"
    )
    departures = (
        "resize='interpolate' pools or upsamples the student map, then a 1×1 conv, where "
        "RepDistiller's ConvReg uses a strided, transposed or valid conv (default 'conv')",
        "a student map smaller than the teacher's by a ratio other than 2, which ConvReg "
        "rejects, is upsampled bilinearly before a 1×1 conv",
    )

    default_name = "fitnet"
    feature_ranks = (2, 4)

    def __init__(
        self, weight: float = 100.0, *, relu: bool = True, resize: str = "conv", **kwargs: Any
    ) -> None:
        super().__init__(weight, **kwargs)
        if resize not in ("conv", "interpolate"):
            raise ConfigError("FitNet.resize", resize, "use 'conv' (RepDistiller) or 'interpolate'")
        self.relu, self.resize = relu, resize
        self.connectors = nn.ModuleList()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        connectors = []
        for (s_name, t_name), (s_shape, t_shape) in zip(self.layer_pairs, shapes):
            if len(s_shape) == 2 and len(t_shape) == 4:
                raise ConfigError(
                    "FitNet.student_layers", s_name,
                    f"a flat student feature {tuple(s_shape)} cannot be regressed onto the teacher's "
                    f"feature map {t_name!r} {tuple(t_shape)}; hint a flat teacher layer or a "
                    "convolutional student layer",
                )
            connectors.append(Connector(s_shape, t_shape, self.relu, self.resize))
        self.connectors = nn.ModuleList(connectors)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        if len(self.connectors) != len(self.layer_pairs):
            raise RuntimeError("FitNet.build() must run first: the DistillationModule calls it")
        return sum(
            F.mse_loss(connector(f_s), f_t)
            for connector, (f_s, f_t) in zip(self.connectors, self.pairs(student, teacher))
        )
