"""ShuffleNetV2 for CIFAR (Ma et al. 2018), as RepDistiller and mdistiller define ``ShuffleV2``.

Net size 1×: a 1×1 stem to 24 channels (no downsampling), three stages (widths 116/232/464)
that each open with a stride-2 down-sampling unit followed by 3/7/3 basic units (channel
split, 1×1-dw3×3-1×1 on one half, concat, shuffle), a 1×1 conv to 1024 channels, average
pooling and a linear classifier.

Stable feature layers, in RepDistiller's ``is_feat`` order: ``stem`` (conv-BN-ReLU, ``f0``),
``layer1`` … ``layer3`` (``f1``-``f3``) and ``pool`` (the 1024-d pre-logit embedding after
the ``head`` 1×1 conv, ``f4``). ``fc`` is the classifier (RepDistiller: ``linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.registry import register_model
from kd_lightning.models.shufflenetv1 import ChannelShuffle

_STEM_CHANNELS = 24

#: net size → (stage widths, head width), (blocks per stage) — RepDistiller's ``configs``
SHUFFLEV2_SIZES: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class BasicUnit(nn.Module):
    """Split channels in half; transform the second half; concat and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class DownUnit(nn.Module):
    """Both branches stride 2: dw3×3-1×1 on the left, 1×1-dw3×3-1×1 on the right."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, net_size: float = 1.0) -> None:
        super().__init__()
        if net_size not in SHUFFLEV2_SIZES:
            raise ValueError(f"net_size must be one of {sorted(SHUFFLEV2_SIZES)}, got {net_size}")
        widths, blocks = SHUFFLEV2_SIZES[net_size]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, _STEM_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(_STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
        planes = _STEM_CHANNELS
        for i, (w, n) in enumerate(zip(widths[:3], blocks), start=1):
            units = [DownUnit(planes, w), *(BasicUnit(w) for _ in range(n))]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            planes = w
        self.head = nn.Sequential(
            nn.Conv2d(planes, widths[3], 1, bias=False), nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.head(x)))


@register_model("ShuffleV2", family="cifar_shufflenet")
def shufflev2(num_classes: int = 100, in_channels: int = 3, net_size: float = 1.0) -> ShuffleNetV2:
    """ShuffleNetV2 (net size 1×: widths 116/232/464, head 1024) for CIFAR."""
    return ShuffleNetV2(num_classes, in_channels, net_size)
