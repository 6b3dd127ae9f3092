"""MobileNetV2 for CIFAR, as RepDistiller (``mobile_half``) and mdistiller (``MobileNetV2``) define it.

This is the network the CRD and DKD tables call "MobileNetV2": expansion ratio 6 and width
multiplier 0.5, a stride-2 3×3 stem (so a 32×32 input is processed at 16×16 and the last
blocks run at 2×2), the seven inverted-residual groups of Sandler et al. 2018 with the
strides (1, 1, 2, 2, 1, 2, 1), a 1×1 conv to 1280 channels, average pooling and a linear
classifier. It is *not* torchvision's ImageNet MobileNetV2 (use ``tv:mobilenet_v2`` for that).

Stable feature layers, in RepDistiller's ``is_feat`` order:

- ``stem``: conv-BN-ReLU, stride 2 (``f0``);
- ``layer1``: groups 0-1 (``f1``), ``layer2``: group 2 (``f2``), ``layer3``: groups 3-4
  (``f3``), ``layer4``: groups 5-6 (``f4``) — the same split points as RepDistiller;
- ``pool``: the pre-logit embedding (after the 1×1 ``head`` conv: average pool, flatten;
  1280-d, ``f5``).

``head`` (1×1 conv-BN-ReLU) and ``fc`` (the classifier) complete the network.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.init import reference_init
from kd_lightning.models.registry import register_model

#: (expansion, channels, blocks, stride) per group; expansion None = the model's ``expand_ratio``
_GROUPS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
#: which groups make up layer1..layer4 (RepDistiller takes f1..f4 after groups 1, 2, 4 and 6)
_STAGES: tuple[tuple[int, ...], ...] = ((0, 1), (2,), (3, 4), (5, 6))


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expand - 3×3 depthwise - 1×1 linear projection; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        # The reference keeps the 1×1 expansion even when expand_ratio is 1.
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.stem = _conv_bn_relu(in_channels, channels, 3, 2)
        groups = []
        for t, c, n, s in _GROUPS:
            out = int(c * width_mult)
            blocks = []
            for b in range(n):
                blocks.append(InvertedResidual(channels, out, s if b == 0 else 1, t or expand_ratio))
                channels = out
            groups.append(nn.Sequential(*blocks))
        for i, members in enumerate(_STAGES, start=1):
            self.add_module(f"layer{i}", nn.Sequential(*(groups[g] for g in members)))
        # As in the reference: 1280 features unless the network is widened beyond 1.
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = _conv_bn_relu(channels, last, 1, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
        reference_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(self.head(x)))


@register_model("MobileNetV2", family="cifar_mobilenet")
def mobilenetv2_cifar(
    num_classes: int = 100, in_channels: int = 3, width_mult: float = 0.5, expand_ratio: int = 6
) -> MobileNetV2:
    """CIFAR MobileNetV2 (expansion 6, width 0.5): mdistiller's ``MobileNetV2``."""
    return MobileNetV2(num_classes, in_channels, width_mult, expand_ratio)


@register_model("mobile_half", family="cifar_mobilenet")
def mobile_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """The same network under RepDistiller's name, so its commands port unchanged."""
    return MobileNetV2(num_classes, in_channels, 0.5, 6)
