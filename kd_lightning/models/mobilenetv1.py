"""MobileNet-V1 for ImageNet (Howard et al. 2017), as mdistiller defines it.

The student of the ResNet-50 → MobileNet-V1 row of the ImageNet KD tables (mdistiller
``mdistiller/models/imagenet/mobilenetv1.py``, the same network as ReviewKD's): width 1.0,
a stride-2 3×3 conv-BN-ReLU stem to 32 channels, then 13 depthwise-separable blocks
(3×3 depthwise conv-BN-ReLU, 1×1 pointwise conv-BN-ReLU) with the strides and widths of
the paper's Table 1, average pooling and a linear classifier over 1024 features (4.2M
parameters at 1000 classes). Initialisation is PyTorch's default, as in mdistiller.

Stable feature layers, at mdistiller's split points (its ``feats`` after blocks 2, 4, 10
and 12, i.e. at strides 4, 8, 16 and 32):

- ``stem``: the first conv-BN-ReLU (stride 2);
- ``layer1`` (→128 ch), ``layer2`` (→256), ``layer3`` (→512), ``layer4`` (→1024);
- ``pool``: the pre-logit embedding (adaptive average pool + flatten, 1024-d).

mdistiller's features before the last ReLU of a stage (``preact_feats``) are not exposed:
its feature heads for this pair (ReviewKD) read the post-ReLU maps listed above.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.registry import register_model

#: (output channels, stride) of the 13 depthwise-separable blocks (Howard et al., Table 1)
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
#: blocks per stage: layer1 ends at 128 channels (stride 4), layer2 at 256, layer3 at 512
_STAGES: tuple[int, ...] = (3, 2, 6, 2)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    ]


def depthwise_separable(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3×3 depthwise conv-BN-ReLU, then 1×1 pointwise conv-BN-ReLU."""
    return nn.Sequential(*_conv_bn_relu(inp, inp, 3, stride, groups=inp), *_conv_bn_relu(inp, oup, 1, 1))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, 32, 3, 2))
        channels, start = 32, 0
        for i, count in enumerate(_STAGES, start=1):
            blocks = []
            for oup, stride in _BLOCKS[start : start + count]:
                blocks.append(depthwise_separable(channels, oup, stride))
                channels = oup
            start += count
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        # adaptive (mdistiller: AvgPool2d(7)): the same at 224 px, and defined at any size
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


@register_model("mobilenetv1", family="imagenet_mobilenet", input_size=224)
def mobilenetv1(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV1:
    """ImageNet MobileNet-V1 (width 1.0): mdistiller's ``MobileNetV1``."""
    return MobileNetV1(num_classes, in_channels)
