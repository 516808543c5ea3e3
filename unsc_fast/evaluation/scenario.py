"""Deletion requests as data splits: which training samples to forget, which remain.

Two scenarios are used throughout the unlearning literature (UNSC, NatMU, SalUn):

* ``full_class``: every training sample of one or several classes is forgotten; the test
  samples of those classes measure whether the class is really gone (``Acc_f`` test).
* ``random_sample``: a random fraction of the training set, of any class, is forgotten; the
  classes all stay, so there is no "forget test" set and its accuracy is NaN.

Three more (issue 16):

* ``sub_class``: the model is trained on coarse labels (``COARSE_GROUPS``: the ten digits in
  five pairs) and every training sample of one *fine* label is forgotten; its coarse class
  stays, so a model retrained without it still puts part of its test samples in that coarse
  class and ``Acc_f`` is compared with the retrained model's, not with 0.
* ``memorised``: the training samples with the highest memorisation score (Feldman & Zhang
  2020, estimated with shadow models: ``memorisation.py``) are forgotten, a sample-wise
  request of the hardest samples instead of random ones.
* ``sequential``: several full-class requests one after another (``stages``); each method is
  applied once per request, to the previous request's result, and the final model is measured
  against a model retrained without every class requested.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from unsc_fast.evaluation.data import DatasetSplit, class_mask

SCENARIOS = ("full_class", "random_sample", "sub_class", "memorised", "sequential")

# Sub-class forgetting's coarse classes: the ten digits in five pairs of digits that share
# strokes and are confused with each other (0/6: a closed loop; 1/7: one long down-stroke; 2/5:
# mirror images of each other; 3/8: the same right-hand bows; 4/9: a closed top on a vertical
# stroke). Coarse class i is the i-th pair, so the default fine label 3 is in coarse class 3
# ("3/8"). The pairs serve the handwritten digits and MNIST-1D alike (MNIST-1D's ten templates are
# 1-D renderings of the same digits); like CIFAR-100's superclasses, each coarse class holds
# fine classes that look alike, so forgetting one of them is not forgetting its coarse class.
COARSE_GROUPS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9))
DIGIT_DATASETS = ("digits", "mnist1d", "mnist", "svhn")  # ten labels that are the digits 0-9


@dataclass
class Scenario:
    """A dataset split plus boolean masks of the forgotten samples in train and test."""

    kind: str
    split: DatasetSplit
    forget_train_mask: torch.Tensor
    forget_test_mask: torch.Tensor
    forget_classes: tuple[int, ...] = ()
    fine_label: int | None = None          # sub_class: the forgotten fine label
    memorisation: np.ndarray | None = None  # memorised: every training sample's score
    stages: tuple["Scenario", ...] = ()     # sequential: the requests, in order (each a full_class)
    step: int | None = None                 # a stage of a sequence: its index
    carry: object = None  # sequential: what a method kept from the previous request (UNSC: its statistics)

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def new_classes(self) -> tuple[int, ...]:
        """A stage of a sequence: the classes this request adds (its forget set's labels)."""
        return tuple(sorted({int(c) for c in self.forget[1].unique()}))

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
    def guard(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The split's validation samples of the classes that stay (data no model trained on), for
        ``unlearn(guard=...)``; None without a validation part, or for a request that is not
        class-wise (a sub-class request's validation labels would be the coarse ones)."""
        if self.split.y_val is None or self.kind != "full_class":
            return None
        keep = ~class_mask(self.split.y_val, self.forget_classes)
        return self.split.x_val[keep], self.split.y_val[keep]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.x_test, self.split.y_test

    def describe(self) -> str:
        forgotten = int(self.forget_train_mask.sum())
        if self.kind == "full_class":
            what = f"class{'es' if len(self.forget_classes) > 1 else ''} {', '.join(map(str, self.forget_classes))}"
        elif self.kind == "sub_class":
            what = f"fine label {self.fine_label} (coarse class {self.split.class_names[coarse_class(self.fine_label)]})"
        elif self.kind == "memorised":
            chosen = self.memorisation[self.forget_train_mask.numpy()]
            what = (f"the {forgotten / len(self.forget_train_mask):.0%} most memorised samples (memorisation "
                    f"{chosen.min():.2f} to {chosen.max():.2f})")
        elif self.kind == "sequential":
            what = "class " + ", then class ".join(", ".join(map(str, stage.new_classes)) for stage in self.stages)
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
        raise ValueError(f"forget_classes: classes {bad} are outside 0..{split.num_classes - 1}")
    if len(classes) >= split.num_classes:
        raise ValueError("forget_classes: cannot forget every class, nothing would remain")
    forget_train = class_mask(split.y_train, classes)
    if not bool(forget_train.any()):
        raise ValueError(f"no training sample has a class in {classes}")
    return Scenario("full_class", split, forget_train, class_mask(split.y_test, classes), classes)


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"forget_fraction must be in (0, 1), got {fraction}")


def _forget_count(samples: int, fraction: float) -> int:
    """How many of ``samples`` training samples a sample-wise request of ``fraction`` forgets:
    at least one, never all."""
    _check_fraction(fraction)
    count = max(1, round(fraction * samples))
    if count >= samples:
        raise ValueError("the forget fraction leaves no remaining sample")
    return count


def random_sample(split: DatasetSplit, fraction: float, seed: int = 0) -> Scenario:
    """Forget a uniformly random ``fraction`` of the training set (chosen with ``seed``)."""
    n = len(split.y_train)
    count = _forget_count(n, fraction)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    forget_train = torch.zeros(n, dtype=torch.bool)
    forget_train[chosen] = True
    return Scenario("random_sample", split, forget_train, torch.zeros(len(split.y_test), dtype=torch.bool))


def coarse_class(fine_label: int) -> int:
    """The coarse class (index into ``COARSE_GROUPS``) of a digit label."""
    return next(i for i, group in enumerate(COARSE_GROUPS) if int(fine_label) in group)


def coarse_split(split: DatasetSplit) -> DatasetSplit:
    """``split`` with its ten digit labels replaced by the five coarse classes of ``COARSE_GROUPS``."""
    if split.num_classes != 10 or split.name not in DIGIT_DATASETS:
        raise ValueError(f"sub-class forgetting groups the ten digit labels in pairs {COARSE_GROUPS}: it needs a "
                         f"digit dataset ({', '.join(DIGIT_DATASETS)}), got {split.name!r} with {split.num_classes} classes")
    table = torch.tensor([coarse_class(label) for label in range(10)])
    return replace(split, y_train=table[split.y_train], y_test=table[split.y_test], num_classes=len(COARSE_GROUPS),
                   y_val=None if split.y_val is None else table[split.y_val],
                   class_names=tuple("/".join(map(str, group)) for group in COARSE_GROUPS))


def sub_class(split: DatasetSplit, fine_label: int = 3) -> Scenario:
    """Train on coarse labels, forget every training sample of the digit ``fine_label``.

    The scenario's split has the coarse labels (the original and retrained models are trained
    on them); ``forget_test`` is the fine label's test samples with their coarse label. No class
    is forgotten (``forget_classes`` is empty): the coarse class keeps its other digit.
    """
    if not isinstance(fine_label, (int, np.integer)) or not 0 <= int(fine_label) < 10:
        raise ValueError(f"forget_classes: sub-class forgetting takes one fine label in 0..9, got {fine_label!r}")
    coarse = coarse_split(split)
    forget_train, forget_test = split.y_train == int(fine_label), split.y_test == int(fine_label)
    if not bool(forget_train.any()):
        raise ValueError(f"forget_classes: no training sample has the fine label {fine_label}")
    return Scenario("sub_class", coarse, forget_train, forget_test, fine_label=int(fine_label))


def memorised(split: DatasetSplit, fraction: float, scores: np.ndarray, tie_break: np.ndarray | None = None) -> Scenario:
    """Forget the ``fraction`` of the training set with the highest memorisation ``scores``
    (``memorisation.memorisation_scores``); equal scores are ordered by ``tie_break`` (higher
    first), then by index."""
    n = len(split.y_train)
    count = _forget_count(n, fraction)
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (n,):
        raise ValueError(f"memorisation scores: one per training sample ({n}) expected, got shape {scores.shape}")
    tie_break = np.zeros(n) if tie_break is None else np.asarray(tie_break, dtype=float)
    order = np.lexsort((np.arange(n), -tie_break, -scores))  # the last key sorts first
    forget_train = torch.zeros(n, dtype=torch.bool)
    forget_train[torch.from_numpy(order[:count].copy())] = True
    return Scenario("memorised", split, forget_train, torch.zeros(len(split.y_test), dtype=torch.bool),
                    memorisation=scores)


def sequential(split: DatasetSplit, first, then) -> Scenario:
    """Full-class requests one after another: ``first`` (one or several classes), then each class
    of ``then``, one request each.

    Stage ``i`` is a full-class scenario on the training data still held after the earlier
    requests (their samples are deleted), whose ``forget_classes`` are all classes requested so
    far (none of them may serve as a new label) and whose forget set is the new class's samples.
    The returned scenario is the final state: every requested class forgotten, which is what
    the retrained reference and the metrics use.
    """
    requests = [tuple(sorted({int(c) for c in first}))] + [(int(c),) for c in then]
    if not then:
        raise ValueError("then_forget: sequential forgetting needs at least one further request (e.g. --then-forget 5)")
    classes = [c for request in requests for c in request]
    if len(set(classes)) != len(classes):
        raise ValueError(f"then_forget: a class is requested twice in the sequence {requests}")
    outside = [c for c in classes if not 0 <= c < split.num_classes]
    if outside:
        raise ValueError(f"forget_classes/then_forget: classes {outside} are outside 0..{split.num_classes - 1}")
    final = full_class(split, classes)  # checks that something remains
    stages, held, so_far = [], torch.ones(len(split.y_train), dtype=torch.bool), ()
    for request in requests:
        so_far = tuple(sorted(so_far + request))
        held_split = replace(split, x_train=split.x_train[held], y_train=split.y_train[held])
        stage = replace(full_class(held_split, so_far), step=len(stages))
        if not bool(stage.forget_train_mask.any()):
            raise ValueError(f"no training sample has a class in {request}")
        stages.append(stage)
        held &= ~class_mask(split.y_train, request)
    return replace(final, kind="sequential", stages=tuple(stages))


def make_scenario(split: DatasetSplit, kind: str, *, forget_classes=(3,), forget_fraction: float = 0.1, seed: int = 0,
                  then_forget=(), memorisation=None) -> Scenario:
    """``kind``: one of ``SCENARIOS`` (dashes are accepted too). ``sub_class`` takes its fine label
    from ``forget_classes`` (one value); ``sequential`` forgets ``forget_classes``, then each of
    ``then_forget``; ``memorised`` needs ``memorisation``, a callable returning (scores,
    tie-break) per training sample (``memorisation.memorisation_scores`` bound to a model)."""
    kind = kind.replace("-", "_")
    if kind == "full_class":
        return full_class(split, forget_classes)
    if kind == "random_sample":
        return random_sample(split, forget_fraction, seed)
    if kind == "sub_class":
        labels = tuple(forget_classes)
        if len(labels) != 1:
            raise ValueError(f"forget_classes: sub-class forgetting takes one fine label, got {list(labels)}")
        return sub_class(split, labels[0])
    if kind == "memorised":
        if memorisation is None:
            raise ValueError("memorised forgetting needs memorisation=, the shadow models' scores")
        _check_fraction(forget_fraction)  # before the shadows train, not after
        return memorised(split, forget_fraction, *memorisation())
    if kind == "sequential":
        return sequential(split, forget_classes, then_forget)
    raise ValueError(f"unknown scenario {kind!r}; choose one of {', '.join(SCENARIOS)}")
