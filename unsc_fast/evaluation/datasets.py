"""The datasets ``unsc-fast compare --dataset`` knows: how each is loaded into a
``DatasetSplit`` and which model it gets when ``--model`` is not given.

The defaults follow the UNSC paper's pairs (CIFAR-10 + All-CNN, CIFAR-100 + ResNet-18,
SVHN + VGG-11, FashionMNIST + AlexNet); MNIST-1D gets its reference 1-D CNN
(``mnist1d_cnn``, whose ``nn.Conv1d`` layers the projector tracks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from unsc_fast.evaluation import dataset_files
from unsc_fast.evaluation.data import DatasetSplit


@dataclass(frozen=True)
class DatasetSpec:
    """``load(root, image_size, seed)`` -> split; ``needs_root``: read from files under --data-root."""

    load: Callable[..., DatasetSplit]
    default_model: str
    needs_root: bool


def arrays_to_split(arrays: dataset_files.ImageArrays, name: str, image_size: int | None = None) -> DatasetSplit:
    """uint8 images -> float32 in [0, 1], optionally resized (bilinear, antialiased, as an image
    library's resize), then standardised per channel with the training set's mean and std."""
    x_train, x_test = (torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
                       for x in (arrays.x_train, arrays.x_test))
    if image_size is not None and tuple(x_train.shape[2:]) != (image_size, image_size):
        x_train, x_test = (F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                         antialias=True) for x in (x_train, x_test))
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return DatasetSplit(  # in place: CIFAR's training set is 600 MB as float32, one copy is enough
        x_train=x_train.sub_(mean).div_(std),
        y_train=torch.from_numpy(arrays.y_train).long(),
        x_test=x_test.sub_(mean).div_(std),
        y_test=torch.from_numpy(arrays.y_test).long(),
        num_classes=arrays.num_classes,
        name=name,
        class_names=arrays.class_names,
    )


def _from_files(name: str, reader):
    def load(root, image_size=None, seed=0):
        return arrays_to_split(reader(root), name, image_size)
    return load


def _digits(root=None, image_size=None, seed=0):
    from unsc_fast.evaluation.data import load_digits_split

    return load_digits_split(seed=seed)


def _mnist1d(root=None, image_size=None, seed=0):
    from unsc_fast.evaluation.mnist1d_data import load_mnist1d_split

    return load_mnist1d_split()  # the package's standard split, whatever the run's seed


def _folder(root, image_size=None, seed=0):
    from unsc_fast.evaluation.image_folder import load_image_folder

    return load_image_folder(root, image_size=image_size, seed=seed)


DATASETS = {
    "digits": DatasetSpec(_digits, "digits_cnn", needs_root=False),
    "mnist1d": DatasetSpec(_mnist1d, "mnist1d_cnn", needs_root=False),
    "cifar10": DatasetSpec(_from_files("cifar10", lambda root: dataset_files.read_cifar(root, 10)), "allcnn", True),
    "cifar100": DatasetSpec(_from_files("cifar100", lambda root: dataset_files.read_cifar(root, 100)), "resnet18", True),
    "svhn": DatasetSpec(_from_files("svhn", dataset_files.read_svhn), "vgg11", True),
    "mnist": DatasetSpec(_from_files("mnist", dataset_files.read_mnist), "alexnet", True),
    "fashionmnist": DatasetSpec(_from_files("fashionmnist", lambda root: dataset_files.read_mnist(root, fashion=True)),
                                "alexnet", True),
    "folder": DatasetSpec(_folder, "digits_cnn", needs_root=True),
}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, root=None, image_size: int | None = None, seed: int = 0) -> DatasetSplit:
    """Load dataset ``name`` (from files under ``root`` where it needs them)."""
    spec = get_dataset(name)
    if spec.needs_root and root is None:
        raise ValueError(f"--dataset {name} reads local files: give --data-root DIR (nothing is downloaded)")
    return spec.load(root, image_size=image_size, seed=seed)
