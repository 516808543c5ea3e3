"""Memorisation scores for the ``memorised`` scenario (forget the hardest samples).

Feldman & Zhang (2020, "What Neural Networks Memorize and Why: Discovering the Long Tail via
Influence Estimation", NeurIPS) define the memorisation of training sample ``i`` as

    mem(i) = P[model trained on a set containing i predicts y_i on x_i]
           - P[model trained on a set without i predicts y_i on x_i]

and estimate both terms with models trained on random subsets. Here, as in their estimator
with subsets of half the data: ``shadows`` models are trained with the harness's recipe
(``recipes.train``) on the balanced random halves of ``membership.inclusion_matrix`` (every
sample is IN exactly half of them), and mem(i) is the mean 0/1 accuracy on sample i over the
shadows that trained on it minus the mean over those that did not. With few shadows the
scores take few values (multiples of 2/shadows), so ties are broken by the same difference
of the true label's softmax probability (a finer reading of the same estimator), then by
index. Everything is seeded: the same seed gives the same ranking.

The inclusion matrix is drawn with ``seed + SEED_OFFSET`` so that the shadows that choose the
forget set are not the U-LiRA attack's shadows (``membership.py``, drawn with ``seed``), which
would otherwise be the very same models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from unsc_fast.evaluation.membership import inclusion_matrix, train_on_halves
from unsc_fast.training import Progress, predict_logits

SEED_OFFSET = 7919


@dataclass
class MemorisationSettings:
    """Shadow models of the estimator: how many (an even number), their epochs and the seed."""

    shadows: int = 8
    epochs: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shadows < 2 or self.shadows % 2:
            raise ValueError(f"memorisation_shadows must be an even number of at least 2, got {self.shadows}")
        if self.epochs < 1:
            raise ValueError(f"memorisation_epochs must be at least 1, got {self.epochs}")


def memorisation_scores(make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                        settings: MemorisationSettings = MemorisationSettings(),
                        progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mem, confidence gap) per sample of ``(x, y)``: the IN-minus-OUT accuracy (Feldman & Zhang)
    and the IN-minus-OUT softmax probability of the true label, over ``settings.shadows``
    models built by ``make_model()`` (fresh weights) and trained on balanced random halves."""
    seed = settings.seed + SEED_OFFSET
    inside = inclusion_matrix(len(y), settings.shadows, seed)
    correct = np.empty(inside.shape)
    confidence = np.empty(inside.shape)
    for shadow, model in train_on_halves(make_model, x, y, inside, settings.epochs, seed, progress, "memorisation"):
        probabilities = predict_logits(model, x).float().softmax(1).cpu()
        correct[shadow] = (probabilities.argmax(1) == y.cpu()).numpy()
        confidence[shadow] = probabilities[torch.arange(len(y)), y.cpu()].numpy()

    def in_minus_out(values: np.ndarray) -> np.ndarray:
        return np.where(inside, values, 0).sum(0) / inside.sum(0) - np.where(inside, 0, values).sum(0) / (~inside).sum(0)

    return in_minus_out(correct), in_minus_out(confidence)


def scorer(config, split, make_model: Callable[[], nn.Module], progress: Progress | None = None):
    """``make_scenario``'s ``memorisation=`` for a ``CompareConfig``: the scores of ``split``'s
    training set, computed only when the memorised scenario asks for them. The shadows train
    ``config.memorisation_epochs`` epochs (None: twice ``train_epochs``, as they see half the data)."""
    settings = MemorisationSettings(config.memorisation_shadows,
                                    config.memorisation_epochs or 2 * config.train_epochs, config.base_seed)
    return lambda: memorisation_scores(make_model, split.x_train, split.y_train, settings, progress)
