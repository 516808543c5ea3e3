"""New labels for the forget samples: UNSC's calibration and the random-label ablation.

Calibration (UNSC, section 3.3 and the official code's "second best" rule, generalised to
several forgotten classes): each forget sample is relabelled with the original model's most
likely class among those allowed, i.e. neither its own label nor a forgotten class. Random
labels draw uniformly among the same allowed classes.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from unsc_fast.training import predict_logits


def disallowed_labels(num_classes: int, y: torch.Tensor, excluded_classes: Iterable[int] = ()) -> torch.Tensor:
    """(N, num_classes) True where a class may not become that sample's new label: its own
    label and every class in ``excluded_classes``."""
    y = torch.as_tensor(y).cpu()
    excluded = sorted({int(c) for c in excluded_classes})
    outside = [c for c in excluded if not 0 <= c < num_classes]
    if outside:
        raise ValueError(f"forget_classes {outside} are outside the model's classes 0..{num_classes - 1}")
    if len(y) and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    mask = torch.zeros(len(y), num_classes, dtype=torch.bool)
    mask[torch.arange(len(y)), y] = True
    if excluded:
        mask[:, excluded] = True
    if bool(mask.all(1).any()):
        raise ValueError("no class is left to relabel with: every class is excluded")
    return mask


def allowed(logits: torch.Tensor, y: torch.Tensor, excluded_classes=()) -> torch.Tensor:
    """``logits`` (float, on the CPU) with each sample's own label and the excluded classes at -inf."""
    logits = logits.float().cpu()
    return logits.masked_fill(disallowed_labels(logits.shape[1], y, excluded_classes), float("-inf"))


def calibrated(logits: torch.Tensor, y: torch.Tensor, excluded_classes=(), soft: bool = False) -> torch.Tensor:
    """Calibration from the original model's ``logits``: the most likely allowed class, or with
    ``soft`` the distribution over the allowed classes (``calibrated_distribution``)."""
    masked = allowed(logits, y, excluded_classes)
    return torch.softmax(masked, dim=1) if soft else masked.argmax(1)


def calibrated_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, excluded_classes=()) -> torch.Tensor:
    """Each sample's most likely class under ``model`` among those not excluded (nor its own)."""
    return calibrated(predict_logits(model, x), y, excluded_classes)


def calibrated_distribution(model: nn.Module, x: torch.Tensor, y: torch.Tensor, excluded_classes=()) -> torch.Tensor:
    """The soft form of calibration: ``model``'s predicted distribution over the allowed classes
    (its own label and the excluded ones removed, the rest renormalised), one row per sample.
    Its argmax is ``calibrated_labels``'s; training toward it keeps the forget samples as unsure
    between the remaining classes as the original was, instead of certain of one."""
    return calibrated(predict_logits(model, x), y, excluded_classes, soft=True)


def random_labels(y: torch.Tensor, num_classes: int, excluded_classes=(), generator=None) -> torch.Tensor:
    """A uniformly random allowed class per sample (never its own label or an excluded class)."""
    weights = (~disallowed_labels(num_classes, y, excluded_classes)).float()
    return torch.multinomial(weights, 1, generator=generator).flatten()
