"""Networks for 28×28 single-channel inputs: MLPs (Hinton et al. 2015) and LeNet-5.

Stable feature layers: ``layer1`` … ``layerN`` (hidden blocks) and ``features``
(the pre-logit embedding); ``fc`` is the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.models.registry import register_model


class MLP(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        hidden: Sequence[int] = (800, 800),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        width = in_channels * input_size * input_size
        names = []
        for i, h in enumerate(hidden, start=1):
            block = nn.Sequential(nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout))
            self.add_module(f"layer{i}", block)
            names.append(f"layer{i}")
            width = h
        self.features = nn.Identity()  # a named hook point for the pre-logit embedding
        self.fc = nn.Linear(width, num_classes)
        self._blocks = names
        self.feature_layers = (*names, "features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for name in self._blocks:
            x = getattr(self, name)(x)
        return self.fc(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; ``width`` scales every layer's channels/units."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: int = 1
    ) -> None:
        super().__init__()
        c1, c2, f1, f2 = 6 * width, 16 * width, 120 * width, 84 * width
        self.layer1 = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        )
        self.layer2 = nn.Sequential(nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        spatial = ((input_size // 2) - 4) // 2
        self.flatten = nn.Flatten()
        self.layer3 = nn.Sequential(nn.Linear(c2 * spatial * spatial, f1), nn.ReLU(inplace=True))
        self.features = nn.Sequential(nn.Linear(f1, f2), nn.ReLU(inplace=True))
        self.fc = nn.Linear(f2, num_classes)
        self.feature_layers = ("layer1", "layer2", "layer3", "features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(x))
        return self.fc(self.features(self.layer3(self.flatten(x))))


@register_model(family="mnist", input_size=28)
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    hidden: Sequence[int] = (800, 800),
    dropout: float = 0.0,
) -> MLP:
    """An MLP with configurable hidden widths."""
    return MLP(num_classes, in_channels, input_size, hidden, dropout)


@register_model(family="mnist", input_size=28)
def mlp_large(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> MLP:
    """Hinton et al. 2015's large net: 2×1200 with dropout."""
    return MLP(num_classes, in_channels, input_size, (1200, 1200), dropout=0.5)


@register_model(family="mnist", input_size=28)
def mlp_small(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> MLP:
    """Hinton et al. 2015's small net: 2×800, no regularisation."""
    return MLP(num_classes, in_channels, input_size, (800, 800))


@register_model(family="mnist", input_size=28)
def mlp_tiny(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> MLP:
    """A 1×64 MLP: the quickstart's student, small enough that KD visibly helps."""
    return MLP(num_classes, in_channels, input_size, (64,))


@register_model(family="mnist", input_size=28)
def lenet5(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: int = 1
) -> LeNet5:
    """LeNet-5 (61.7k parameters at width 1)."""
    return LeNet5(num_classes, in_channels, input_size, width)
