"""The weight initialisation RepDistiller's CIFAR models share (WRN, VGG, MobileNetV2)."""

from __future__ import annotations

import math

from torch import nn


def reference_init(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal convs (fan-out), unit BN, zero biases; linear weights ~ N(0, linear_std)
    when given, else PyTorch's default (as WRN does)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
