"""The reference models of MNIST-1D (Greydanus 2020, "Scaling down deep learning"; the
``ConvBase`` and ``MLPBase`` of the mnist1d repository's notebooks), for (N, 1, 40) signals.

They are small (about 5k and 15k parameters) and the gap between them is the dataset's point:
the CNN reaches ~94 % test accuracy, the MLP ~68 %, so unlearning methods have real errors to
tell apart on a CPU in seconds.
"""
from __future__ import annotations

import torch
from torch import nn


class MNIST1DCNN(nn.Module):
    """Three Conv1d layers (kernels 5, 3, 3; stride 2; padding 1; ``width`` channels; ReLU) on a
    length-40 signal, giving 5 positions, then one Linear on the flattened ``width * 5`` features."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 25, length: int = 40) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, width, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.fc = nn.Linear(width * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MNIST1DMLP(nn.Module):
    """Input -> ``hidden`` (ReLU) -> a residual ``hidden`` layer (h + relu(W h)) -> classes."""

    def __init__(self, num_classes: int = 10, channels: int = 1, length: int = 40, hidden: int = 100) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(channels * length, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.linear1(self.flatten(x)))
        h = h + torch.relu(self.linear2(h))
        return self.linear3(h)
