"""Models: a small CNN for the bundled digits, and the official code's 32x32 models
(All-CNN and a CIFAR-style ResNet-18) for the benchmarks."""
from __future__ import annotations

from torch import nn


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Three conv blocks and two Linear layers for (channels, 8, 8) inputs."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(channels, width),
            _conv_bn(width, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class AllCNN(nn.Module):
    """All-CNN-C (Springenberg et al. 2015) with batch norm, as in the UNSC code, for 32x32 inputs."""

    def __init__(self, num_classes: int = 10, channels: int = 3, width: int = 96) -> None:
        super().__init__()
        wide = 2 * width
        self.features = nn.Sequential(
            _conv_bn(channels, width),
            _conv_bn(width, width),
            _conv_bn(width, width, stride=2),
            _conv_bn(width, wide),
            _conv_bn(wide, wide),
            _conv_bn(wide, wide, stride=2),
            _conv_bn(wide, wide, padding=0),
            _conv_bn(wide, wide, kernel_size=1, padding=0),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(wide, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_channels, out_channels, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as used on CIFAR."""

    def __init__(self, num_classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        layers, in_channels = [_conv_bn(channels, 64)], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
