"""The bundled models. Each takes ``input_shape`` and ``num_outputs``, which the runner fills in from the data."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten, then Linear-ReLU(-Dropout) blocks of the given widths, then a linear head."""

    def __init__(
        self, input_shape: tuple[int, ...], num_outputs: int, hidden_sizes: list[int] = (128,), dropout: float = 0.0
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Flattened here by a tensor method rather than by calling the Flatten layer, whose module call costs more
        # than the flatten itself (1.3 µs a step; for flat rows it is a view of them). The layer stays in the
        # Sequential so that the others keep their numbers in the state dict (checkpoints written before load).
        # Written so torch.fx, TorchScript and torch.export still trace it: no branch on the input, one loop.
        inputs = inputs.flatten(1)
        for index, layer in enumerate(self):
            if index > 0:
                inputs = layer(inputs)
        return inputs


class SmallCNN(nn.Sequential):
    """3x3 conv-BN-ReLU blocks, each halving the resolution, then global average pooling and a linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, channels: list[int] = (16, 32)):
        layers: list[nn.Module] = []
        in_channels = input_shape[0]
        for out_channels in channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_outputs)]
        super().__init__(*layers)


class LinearRegression(nn.Sequential):
    """One linear layer: for the 1-in 1-out regression data, y = w x + b."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def resnet18(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """torchvision's ResNet-18 with its first convolution taking the data's channels."""
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(weights=None, num_classes=num_outputs)
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
