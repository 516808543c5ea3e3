"""Data the library ships with: scikit-learn's bundled handwritten digits (no download).

``load_digits`` holds 1,797 real 8x8 grey-scale digits; they are split once, stratified,
into train and test, and standardised with the training set's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from unsc_fast.unlearning import data as unlearning_data


@dataclass
class DatasetSplit:
    """Images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64 for train and test; optionally a
    validation part held out of the training data (``validation_part``), which no model trains on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str = "digits"
    class_names: tuple[str, ...] | None = None  # for tables and plots; None means "0, 1, 2, ..."
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> DatasetSplit:
    """The bundled digits as (1, 8, 8) images, split ``test_fraction`` stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    mean, std = x_train.mean(), x_train.std()
    return DatasetSplit(
        x_train=torch.from_numpy((x_train - mean) / std),
        y_train=torch.from_numpy(y_train).long(),
        x_test=torch.from_numpy((x_test - mean) / std),
        y_test=torch.from_numpy(y_test).long(),
        num_classes=10,
    )


def class_mask(labels: torch.Tensor, classes) -> torch.Tensor:
    """Boolean mask of the samples whose label is in ``classes``."""
    return torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))



def _held_out_mask(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Bool mask of ``fraction`` of every class of ``labels`` (rounded per class), drawn with ``seed``:
    ``unlearning.data.held_out``, the library's one per-class draw, after a check of the fraction."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    return unlearning_data.held_out(labels, fraction, torch.Generator().manual_seed(seed))


def holdout_split(split: DatasetSplit, fraction: float = 0.2, seed: int = 0) -> DatasetSplit:
    """``split`` with its test set replaced by ``fraction`` of every class of its training set
    (drawn with ``seed``), which leaves the training set: settings are chosen on this validation
    split so that the test split is never read."""
    held_out = _held_out_mask(split.y_train, fraction, seed)
    return DatasetSplit(split.x_train[~held_out], split.y_train[~held_out], split.x_train[held_out],
                        split.y_train[held_out], split.num_classes, split.name, split.class_names)


def validation_part(split: DatasetSplit, fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    """``split`` with ``fraction`` of every class of its training set (drawn with ``seed``) moved to
    ``x_val`` / ``y_val``: data no model trains on, which ``unlearn()``'s guard can then use (a slice
    of the training data that the original fit reads lost memorisation as damage: docs/fidelity.md)."""
    held_out = _held_out_mask(split.y_train, fraction, seed)
    return replace(split, x_train=split.x_train[~held_out], y_train=split.y_train[~held_out],
                   x_val=split.x_train[held_out], y_val=split.y_train[held_out])
