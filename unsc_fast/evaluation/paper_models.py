"""The four architectures of the official UNSC experiments, rebuilt from their published
definitions (facts, not code): All-CNN (CIFAR-10), ResNet-18 (CIFAR-100), VGG-11 with batch
norm (SVHN) and a small AlexNet (FashionMNIST).

The top-level modules are called ``features`` and ``fc`` as in the official code, so a layer's
name here (``features.0.0``, ``fc.0``, ...) points at the same layer there. Weights keep
PyTorch's default initialisation: the official ``Base`` calls its ``init_weights`` before the
subclass has created any layer, so the official models train from the defaults too.

Every model takes ``channels`` (1 for the 28x28 grey-scale sets, 3 for CIFAR/SVHN). Where the
official model only works at 32x32, the one change that lets it run at 28x28 is documented on
the class and in ``docs/fidelity.md``; at 32x32 each computes exactly the official function.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None) -> nn.Sequential:
    """Conv (no bias: the batch norm's shift replaces it), BatchNorm, ReLU; "same" padding by default."""
    if padding is None:
        padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AllCNN(nn.Module):
    """All-CNN as the UNSC code builds it for CIFAR-10: eight conv-BN-ReLU blocks, all 3x3 with
    padding 1 (the last 1x1), down-sampling by two stride-2 convs, a global average and one Linear.

    ``width`` is the first stage's filter count (the second has twice as many): the official
    experiments use ``filters_percentage=0.5`` of the 96/192 original, so 48/96 is the default.
    The official final ``AvgPool2d(8)`` averages the whole 8x8 map of a 32x32 input; averaging the
    whole map (adaptive pooling) is the same there and also works for 28x28 (a 7x7 map).
    ``dropout`` inserts the two optional ``Dropout`` layers (off in the official runs).
    """

    def __init__(self, num_classes: int = 10, channels: int = 3, width: int = 48, dropout: bool = False) -> None:
        super().__init__()
        wide = 2 * width
        drop = (lambda: nn.Dropout()) if dropout else (lambda: nn.Identity())
        self.features = nn.Sequential(
            conv_bn_relu(channels, width),
            conv_bn_relu(width, width),
            conv_bn_relu(width, wide, stride=2),
            drop(),
            conv_bn_relu(wide, wide),
            conv_bn_relu(wide, wide),
            conv_bn_relu(wide, wide, stride=2),
            drop(),
            conv_bn_relu(wide, wide),
            conv_bn_relu(wide, wide, kernel_size=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(wide, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


VGG11_STAGES = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # configuration "A"


class VGG11(nn.Module):
    """VGG-11 with batch norm (configuration A) as the UNSC code uses it on SVHN: 3x3 convs with
    padding and bias, BN, ReLU, five 2x2 max-pools to a 1x1x512 map, then 4096-4096 Linear layers
    with ReLU and dropout 0.5.

    The pools round up (``ceil_mode``): on 32x32 inputs every map has an even size, so this is
    exactly the official network; on 28x28 inputs (7 -> 4 -> 2 -> 1) it still ends at 1x1
    instead of failing at the fifth pool.
    """

    def __init__(self, num_classes: int = 10, channels: int = 3, stages=VGG11_STAGES) -> None:
        super().__init__()
        layers, in_channels = [], channels
        for stage in stages:
            if stage == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                continue
            layers += [nn.Conv2d(in_channels, stage, 3, padding=1), nn.BatchNorm2d(stage), nn.ReLU(inplace=True)]
            in_channels = stage
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(in_channels, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _alexnet_map_size(image_size: int) -> int:
    """Side of AlexNet's last map: valid convs of kernel 4, 3, 2, each followed by a 2x2 pool."""
    size = image_size
    for kernel in (4, 3, 2):
        size = (size - kernel + 1) // 2
    if size < 1:
        raise ValueError(f"AlexNet needs inputs of at least 23x23 pixels, got {image_size}x{image_size}")
    return size


class AlexNet(nn.Module):
    """The small AlexNet of the UNSC code (FashionMNIST): three bias-free valid convs (kernels 4,
    3, 2; 64, 128, 256 filters) each with BN, ReLU, dropout (0.2, 0.2, 0.5) and a 2x2 max-pool,
    then two bias-free 2048-wide Linear layers with BatchNorm1d, ReLU and dropout 0.5, and a
    bias-free output layer. Both 28x28 and 32x32 inputs end on a 2x2 map (256 * 2 * 2 features).
    """

    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        layers, in_channels = [], channels
        for out_channels, kernel, dropout in ((64, 4, 0.2), (128, 3, 0.2), (256, 2, 0.5)):
            layers += [nn.Conv2d(in_channels, out_channels, kernel, bias=False), nn.BatchNorm2d(out_channels),
                       nn.ReLU(), nn.Dropout(dropout), nn.MaxPool2d(2)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        flat = in_channels * _alexnet_map_size(image_size) ** 2
        self.fc = nn.Sequential(
            nn.Linear(flat, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(2048, num_classes, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN (ReLU between), plus the input (through a 1x1
    conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual_function(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images as the UNSC code uses it on CIFAR-100: a 3x3 stem (no
    max-pool), four stages of two basic blocks (64, 128, 256, 512 channels; stride 1, 2, 2, 2),
    global average pooling and one Linear. Any input size works (the pooling is adaptive)."""

    def __init__(self, num_classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        layers, in_channels = [nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True)], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels)))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avg_pool(self.features(x)), 1))
