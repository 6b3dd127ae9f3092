"""ShuffleNetV1 for CIFAR (Zhang et al. 2018), as RepDistiller and mdistiller define ``ShuffleV1``.

A 1×1 stem to 24 channels (no downsampling), then three stages of 4/8/4 grouped bottlenecks
(3 groups, widths 240/480/960). The first bottleneck of each stage has stride 2 and
concatenates an average-pooled shortcut; the others add an identity shortcut. The first
pointwise conv after the stem is ungrouped (24 input channels are too few to split), exactly
as in the reference.

Stable feature layers, in RepDistiller's ``is_feat`` order: ``stem`` (conv-BN-ReLU, ``f0``),
``layer1`` … ``layer3`` (``f1``-``f3``) and ``pool`` (average pool + flatten: the 960-d
pre-logit embedding, ``f4``). ``fc`` is the classifier (RepDistiller: ``linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.registry import register_model

_STEM_CHANNELS = 24


class ChannelShuffle(nn.Module):
    """[N, g·c, H, W] → interleave the g groups' channels."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == _STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, _STEM_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(_STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
        planes = _STEM_CHANNELS
        for i, (out, n) in enumerate(zip(out_planes, num_blocks), start=1):
            blocks = []
            for b in range(n):
                # The stride-2 block concatenates its shortcut, so its branch makes the rest.
                blocks.append(ShuffleBottleneck(planes, out - planes if b == 0 else out,
                                                2 if b == 0 else 1, groups))
                planes = out
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(planes, num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


@register_model("ShuffleV1", family="cifar_shufflenet")
def shufflev1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 (g=3, widths 240/480/960, blocks 4/8/4) for CIFAR."""
    return ShuffleNetV1(num_classes, in_channels)
