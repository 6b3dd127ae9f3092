"""VGG with batch norm for CIFAR, as RepDistiller and mdistiller define them.

Five stages of 3×3 conv-BN-ReLU layers (convs keep their bias, as in the reference), max
pooling between the first four, then global average pooling and a single linear classifier
(the ImageNet FC layers are removed). ``vgg8`` is RepDistiller's extra configuration "S"
(one conv per stage); ``vgg11/13/16/19`` are the usual configurations A/B/D/E. The registry
names map to RepDistiller's ``vgg*_bn`` builders, exactly as its ``model_dict`` does.

Stable feature layers, in RepDistiller's ``is_feat`` order:

- ``stem``: the first stage, after its ReLU (``f0``, 64 channels at full resolution);
- ``layer1`` … ``layer4``: max-pool then the next stage, after its ReLU (``f1``-``f4``);
- ``pool``: the pre-logit embedding (global average pool, flatten; 512-d, ``f5``).

``fc`` is the classifier (RepDistiller: ``classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.models.init import reference_init
from kd_lightning.models.registry import register_model

#: conv widths per stage for each configuration
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _stage(widths: Sequence[int], in_channels: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        config: Sequence[Sequence[int]],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [tuple(stage) for stage in config]
        self.stem = _stage(widths[0], in_channels, pool=False)
        self.layer1 = _stage(widths[1], widths[0][-1], pool=True)
        self.layer2 = _stage(widths[2], widths[1][-1], pool=True)
        self.layer3 = _stage(widths[3], widths[2][-1], pool=True)
        # RepDistiller pools before the last stage only for 64×64 inputs (TinyImageNet). We
        # pool whenever the map is still 8×8 or larger: the same for 32×32 and 64×64 inputs,
        # and the last stage never runs on a map bigger than it was designed for.
        self.pool3 = nn.MaxPool2d(2, 2)
        self.layer4 = _stage(widths[4], widths[3][-1], pool=False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[4][-1], num_classes)
        self.feature_layers = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
        reference_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        if x.shape[-2] >= 8:
            x = self.pool3(x)
        return self.fc(self.pool(self.layer4(x)))


def _make(name: str):
    def builder(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(VGG_CONFIGS[name], num_classes, in_channels)

    builder.__doc__ = f"{name.upper()} with batch norm for CIFAR (RepDistiller ``{name}_bn``)."
    return builder


for _name in VGG_CONFIGS:
    register_model(_name, family="cifar_vgg")(_make(_name))
