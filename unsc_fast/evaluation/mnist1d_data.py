"""MNIST-1D (Greydanus 2020), generated on this machine by the ``mnist1d`` package.

``make_dataset`` builds the signals from ten templates bundled in the package's code; its
``get_dataset`` would instead try to download a pickle first, so it is never called here.
With the package's default arguments (5,000 signals of length 40, seed 42, 80 % train) this
is the standard split: 4,000 training and 1,000 test signals, shaped ``(N, 1, 40)`` for Conv1d.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from unsc_fast.evaluation.data import DatasetSplit


def generate_mnist1d(seed: int | None = None, num_samples: int | None = None) -> dict:
    """The package's dataset dict (``x``, ``y``, ``x_test``, ``y_test``), generated locally.

    ``make_dataset`` seeds Python's and numpy's global generators; their states are restored
    afterwards so that loading the data does not change the random streams of the caller.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # an optional extra: say how to get it
        raise ImportError("MNIST-1D needs the mnist1d package: pip install 'unsc_fast[eval]'") from error
    args = get_dataset_args()
    if seed is not None:
        args.seed = seed
    if num_samples is not None:
        args.num_samples = num_samples
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def load_mnist1d_split(seed: int | None = None, num_samples: int | None = None) -> DatasetSplit:
    """MNIST-1D as a ``DatasetSplit`` of ``(N, 1, 40)`` float32 signals, standardised with the
    training set's mean and standard deviation; ``seed=None`` is the package's standard data."""
    data = generate_mnist1d(seed, num_samples)
    x_train = np.asarray(data["x"], dtype=np.float32)[:, None]
    x_test = np.asarray(data["x_test"], dtype=np.float32)[:, None]
    mean, std = x_train.mean(), x_train.std()
    return DatasetSplit(
        x_train=torch.from_numpy((x_train - mean) / std),
        y_train=torch.from_numpy(np.asarray(data["y"])).long(),
        x_test=torch.from_numpy((x_test - mean) / std),
        y_test=torch.from_numpy(np.asarray(data["y_test"])).long(),
        num_classes=10,
        name="mnist1d",
    )
