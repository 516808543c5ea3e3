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


def tiny_digits(forget: int):
    """(split, DigitsCNN(width=8) trained on it, full-class scenario forgetting ``forget``,
    10 % random-sample scenario) on 30 training and 15 test digits per class.

    Seed 0, so every test module that uses it gets the same model (its fixture sets one
    thread first: these tiny convolutions run fastest that way).
    """
    from unsc_fast.evaluation.data import DatasetSplit, load_digits_split
    from unsc_fast.evaluation.models import DigitsCNN
    from unsc_fast.evaluation.recipes import train
    from unsc_fast.evaluation.scenario import make_scenario

    digits = load_digits_split(seed=0)
    split = DatasetSplit(*per_class(digits.x_train, digits.y_train, 30),
                         *per_class(digits.x_test, digits.y_test, 15), num_classes=10)
    torch.manual_seed(0)
    model = train(DigitsCNN(width=8), split.x_train, split.y_train, epochs=15, seed=0)
    full_class = make_scenario(split, "full_class", forget_classes=(forget,))
    random_sample = make_scenario(split, "random_sample", forget_fraction=0.1, seed=0)
    return split, model, full_class, random_sample
