"""CIFAR ResNets (He et al. 2016, §4.2), as RepDistiller and mdistiller define them.

Depth 6n+2 with three stages of n BasicBlocks. Shortcuts that change shape use a 1×1
conv + BN (option B), as in RepDistiller's ``resnet.py`` (also mdistiller's, torchdistill's
and Knowledge-Distillation-Zoo's); the published KD tables were made with this variant. It
has 2,752 more parameters than He et al.'s option A (zero-padding shortcuts) at every
depth, e.g. 272,474 instead of 269,722 for resnet20 on CIFAR-10.

Stable feature layers, in RepDistiller's ``is_feat`` order: ``stem`` (conv-BN-ReLU,
``f0``), ``layer1``-``layer3`` (``f1``-``f3``) and ``pool`` (the pre-logit embedding,
``f4``); ``fc`` is the classifier. RepDistiller's ``conv1/bn1`` are our ``stem.0/stem.1``.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        planes = widths[0]
        stages = []
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(planes, w, stride if b == 0 else 1))
                planes = w
            stages.append(nn.Sequential(*blocks))
            self.add_module(f"layer{i + 1}", stages[-1])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(planes, num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "pool")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def _make(depth: int, widths: tuple[int, int, int, int]):
    def builder(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels)

    builder.__doc__ = f"CIFAR ResNet-{depth}, stage widths {widths[1:]}."
    return builder


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", family="cifar_resnet")(_make(_depth, (16, 16, 32, 64)))
for _depth in (8, 32):
    register_model(f"resnet{_depth}x4", family="cifar_resnet")(_make(_depth, (32, 64, 128, 256)))
