"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), as RepDistiller and mdistiller define them.

WRN-d-k has depth d = 6n+4 and widths (16, 16k, 32k, 64k). Blocks are pre-activation
(BN-ReLU-conv); a block that changes width or stride has a 1×1 conv shortcut (no BN) fed by
the *activated* input. The network ends with BN-ReLU, global average pooling and a linear
classifier.

Stable feature layers, in RepDistiller's ``is_feat`` order:

- ``stem``: the first 3×3 conv (16 channels, before any BN — RepDistiller's ``f0``);
- ``layer1`` … ``layer3``: the three groups of blocks (``f1``-``f3``, before the final BN);
- ``pool``: the pre-logit embedding (final BN-ReLU, average pool, flatten; ``f4``).

``fc`` is the classifier. RepDistiller names these ``conv1``, ``block1``-``block3`` and
``fc``; only the names differ, the parameter counts are identical.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.init import reference_init
from kd_lightning.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 (+ shortcut)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # As in the reference, the width test alone decides the shortcut type: a stride-2
        # block always changes width in every WRN configuration.
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        # Identity shortcuts carry the raw input; projection shortcuts see the activated one.
        identity = x if self.shortcut is None else self.shortcut(act)
        return identity + out


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        planes = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [WideBasicBlock(planes if b == 0 else w, w, stride if b == 0 else 1, dropout)
                      for b in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            planes = w
        self.pool = nn.Sequential(
            nn.BatchNorm2d(planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(planes, num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "pool")
        # The reference initialisation: He-normal convs (fan-out), unit BN, zero linear bias.
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def _make(depth: int, widen_factor: int):
    def builder(num_classes: int = 100, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)

    builder.__doc__ = f"WRN-{depth}-{widen_factor} (RepDistiller ``wrn_{depth}_{widen_factor}``)."
    return builder


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_k}", family="cifar_wrn")(_make(_depth, _k))
