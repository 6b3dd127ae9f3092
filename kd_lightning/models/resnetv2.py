"""The CIFAR ResNet50 of RepDistiller's and mdistiller's zoo (``models/resnetv2.py``).

An ImageNet-width bottleneck ResNet-50 (stages of 3/4/6/3 blocks, 64-512 planes, expansion
4) adapted to 32×32 inputs: a 3×3 stride-1 first conv and no max-pool, so the four stages
run at 32, 16, 8 and 4 pixels. Shortcuts that change shape are 1×1 conv + BN. This is the
teacher of RepDistiller's cross-architecture table (ResNet50 → MobileNetV2 / vgg8, 79.34 %
top-1 on CIFAR-100), 23.7 M parameters at 100 classes.

Stable feature layers, in RepDistiller's ``is_feat`` order: ``stem`` (conv-BN-ReLU,
``f0``), ``layer1``-``layer4`` (``f1``-``f4``) and ``pool`` (the pre-logit embedding,
``f5``); ``fc`` is the classifier. RepDistiller's ``conv1/bn1`` are our ``stem.0/stem.1``
and its ``linear`` is our ``fc``; blocks keep its names (``conv1``-``conv3``, ``bn1``-``bn3``,
``shortcut``), and modules are registered in its order, so its state dicts map one to one
(``kd-lightning import-teacher``).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.registry import register_model


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()  # identity, as in the reference (no parameters)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNetV2(nn.Module):
    """Bottleneck ResNet for 32×32 inputs (RepDistiller's ``ResNet`` class)."""

    def __init__(self, num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
                 num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        planes_in = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(planes_in, planes, stride if b == 0 else 1))
                planes_in = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(planes_in, num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
        for m in self.modules():  # the reference's init (zero_init_residual=False)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


@register_model("ResNet50", family="cifar_resnetv2")
def resnet50_cifar(num_classes: int = 100, in_channels: int = 3) -> CifarResNetV2:
    """RepDistiller's / mdistiller's CIFAR ``ResNet50`` (bottleneck 3/4/6/3, 3×3 stem)."""
    return CifarResNetV2((3, 4, 6, 3), num_classes, in_channels)
