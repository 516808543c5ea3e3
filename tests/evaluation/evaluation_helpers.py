"""Small fixtures the evaluation tests share (one copy instead of one per file)."""
from __future__ import annotations

import torch
from torch import nn


class Lookup(nn.Module):
    """A 'model' whose logits are given: sample i (its first feature) gets ``logits[i]``."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def per_class(x, y, count):
    """The first ``count`` samples of each of the ten classes."""
    index = torch.cat([torch.nonzero(y == c).flatten()[:count] for c in range(10)])
    return x[index], y[index]
