"""The targets a forget set is trained towards: calibrated or random labels (classifiers), the
targets as they are, or a user's ``relabel(inputs, targets)``; for tensors once up front, for a
loader batch by batch."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from unsc_fast.calibration import calibrated, calibrated_distribution, calibrated_labels, random_labels
from unsc_fast.training import batch_logits, batch_parts, predict_logits

CLASSIFIER_RULES = ("calibrate", "soft", "random")  # the rules that relabel a classifier's samples
LABEL_RULES = (*CLASSIFIER_RULES, "keep")
Relabel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchRelabel = Callable[[tuple, dict, torch.Tensor], torch.Tensor]  # (args, kwargs, targets) of a batch


def first_input(args: tuple, kwargs: dict):
    """The input a user's ``relabel(inputs, targets)`` gets: the first positional one, else the
    first keyword one (a Hugging Face dict's ``input_ids`` or ``pixel_values``)."""
    return args[0] if args else next(iter(kwargs.values()))


def tensor_targets(model, forget, rule, forget_classes, num_classes, generator) -> torch.Tensor:
    """New targets for the whole in-memory forget set, before any training step."""
    x_forget, y_forget = forget
    if len(x_forget) != len(y_forget):
        raise ValueError(f"forget inputs ({len(x_forget)}) and labels ({len(y_forget)}) differ in length")
    if len(x_forget) == 0:
        raise ValueError("the forget set is empty")
    if rule == "keep":
        return y_forget
    if callable(rule):
        return rule(x_forget, y_forget)
    if rule == "calibrate":
        return calibrated_labels(model, x_forget, y_forget, forget_classes)
    if rule == "soft":
        return calibrated_distribution(model, x_forget, y_forget, forget_classes)
    if num_classes is None:
        num_classes = int(predict_logits(model, x_forget[:1]).shape[1])
    return random_labels(y_forget, num_classes, forget_classes, generator)


def relabel_rule(model, rule, forget_classes, num_classes, generator) -> BatchRelabel | None:
    """Per-batch relabelling for a loader, from the batch's inputs as the model takes them (a
    Hugging Face dict's every key). Calibration asks a frozen copy of the original model (the
    model itself changes while training; a loader's order may change per epoch, so the targets
    cannot be computed once up front without holding the whole forget set)."""
    if rule == "keep":
        return None
    if callable(rule):
        return lambda args, kwargs, y: rule(first_input(args, kwargs), y)
    if rule in ("calibrate", "soft"):
        original = copy.deepcopy(model).requires_grad_(False)
        soft = rule == "soft"
        return lambda args, kwargs, y: calibrated(batch_logits(original, args, kwargs), y, forget_classes,
                                                  soft).to(y.device)

    classes = [num_classes]  # read from the model's output on the first batch where not given

    def draw(args, kwargs, y):
        if classes[0] is None:
            classes[0] = int(batch_logits(model, args, kwargs).shape[1])
        return random_labels(y, classes[0], forget_classes, generator).to(y.device)

    return draw


class Relabelled:
    """Re-iterable view of a loader whose tuple batches get new targets (dict batches: new
    ``"labels"``)."""

    def __init__(self, loader, relabel: BatchRelabel | None) -> None:
        self.loader, self.relabel = loader, relabel

    def __len__(self) -> int:
        return len(self.loader)  # TypeError for a loader without one: the loop then checks once per pass

    def __iter__(self):
        seen = False
        for batch in self.loader:
            seen = True
            if self.relabel is None:
                yield batch
                continue
            args, kwargs, targets = batch_parts(batch)
            new = self.relabel(args, kwargs, targets)
            yield {**batch, "labels": new} if isinstance(batch, dict) else (batch[0], new, *batch[2:])
        if not seen:
            raise ValueError("the forget set is empty")


