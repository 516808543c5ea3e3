"""Deletion requests as data splits: which training samples to forget, which remain.

Two scenarios are used throughout the unlearning literature (UNSC, NatMU, SalUn):

* ``full_class``: every training sample of one or several classes is forgotten; the test
  samples of those classes measure whether the class is really gone (``Acc_f`` test).
* ``random_sample``: a random fraction of the training set, of any class, is forgotten; the
  classes all stay, so there is no "forget test" set and its accuracy is NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unsc_fast.evaluation.data import DatasetSplit, class_mask

SCENARIOS = ("full_class", "random_sample")


@dataclass
class Scenario:
    """A dataset split plus boolean masks of the forgotten samples in train and test."""

    kind: str
    split: DatasetSplit
    forget_train_mask: torch.Tensor
    forget_test_mask: torch.Tensor
    forget_classes: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def remain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples that stay: what a retrained model would have seen."""
        keep = ~self.forget_train_mask
        return self.split.x_train[keep], self.split.y_train[keep]

    @property
    def forget(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples the deletion request names."""
        return self.split.x_train[self.forget_train_mask], self.split.y_train[self.forget_train_mask]

    @property
    def remain_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ~self.forget_test_mask
        return self.split.x_test[keep], self.split.y_test[keep]

    @property
    def forget_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Test samples of the forgotten classes (empty for random-sample forgetting)."""
        return self.split.x_test[self.forget_test_mask], self.split.y_test[self.forget_test_mask]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.x_test, self.split.y_test

    def describe(self) -> str:
        forgotten = int(self.forget_train_mask.sum())
        if self.kind == "full_class":
            what = f"class{'es' if len(self.forget_classes) > 1 else ''} {', '.join(map(str, self.forget_classes))}"
        else:
            what = f"{forgotten / len(self.forget_train_mask):.0%} random samples"
        return f"{self.kind.replace('_', '-')} forgetting of {what} ({forgotten} of {len(self.forget_train_mask)} training samples, {self.split.name})"


def full_class(split: DatasetSplit, classes) -> Scenario:
    """Forget every training sample of ``classes`` (one or several)."""
    classes = tuple(sorted({int(c) for c in classes}))
    if not classes:
        raise ValueError("full-class forgetting needs at least one class")
    bad = [c for c in classes if not 0 <= c < split.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside 0..{split.num_classes - 1}")
    if len(classes) >= split.num_classes:
        raise ValueError("cannot forget every class: nothing would remain")
    forget_train = class_mask(split.y_train, classes)
    if not bool(forget_train.any()):
        raise ValueError(f"no training sample has a class in {classes}")
    return Scenario("full_class", split, forget_train, class_mask(split.y_test, classes), classes)


def random_sample(split: DatasetSplit, fraction: float, seed: int = 0) -> Scenario:
    """Forget a uniformly random ``fraction`` of the training set (chosen with ``seed``)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"forget fraction must be in (0, 1), got {fraction}")
    n = len(split.y_train)
    count = max(1, round(fraction * n))
    if count >= n:
        raise ValueError("the forget fraction leaves no remaining sample")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    forget_train = torch.zeros(n, dtype=torch.bool)
    forget_train[chosen] = True
    return Scenario("random_sample", split, forget_train, torch.zeros(len(split.y_test), dtype=torch.bool))


def make_scenario(split: DatasetSplit, kind: str, *, forget_classes=(3,), forget_fraction: float = 0.1, seed: int = 0) -> Scenario:
    """``kind`` is ``"full_class"`` or ``"random_sample"`` (dashes are accepted too)."""
    kind = kind.replace("-", "_")
    if kind == "full_class":
        return full_class(split, forget_classes)
    if kind == "random_sample":
        return random_sample(split, forget_fraction, seed)
    raise ValueError(f"unknown scenario {kind!r}; choose one of {', '.join(SCENARIOS)}")
