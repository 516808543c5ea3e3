"""Load a user's images laid out like ``torchvision.datasets.ImageFolder``.

torchvision cannot be installed beside this torch build, so this is a small loader of our
own for the same layout: one sub-folder per class, named after the class, classes indexed
in sorted order::

    root/cat/001.png          or, with a fixed split,   root/train/cat/001.png
    root/dog/xyz.jpg                                     root/test/cat/002.png

Images are read with Pillow (PNG, JPEG, BMP, ...); ``.npy`` arrays (H x W or H x W x C)
are read with numpy alone, so a folder of arrays works without Pillow. Everything is
loaded into memory as float32 in [0, 1], resized to one size, converted to one channel
count, then standardised per channel with the training set's statistics, like the digits.
Without ``train/`` and ``test/`` sub-folders the samples are split stratified by class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unsc_fast.evaluation.data import DatasetSplit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
ARRAY_SUFFIXES = {".npy"}


def find_classes(root: Path) -> list[str]:
    """Sorted names of the class sub-folders (hidden folders are ignored)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    return classes


def list_samples(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, class index) for every image or array file under each class folder, sorted."""
    samples = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES:
                samples.append((path, index))
    return samples


def read_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One file as a (channels, H, W) float32 array in [0, 1]."""
    if path.suffix.lower() in ARRAY_SUFFIXES:
        array = np.load(path).astype(np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.max(initial=0.0) > 1.0:
            array = array / 255.0
        image = _to_channels(array.transpose(2, 0, 1), channels)
        if size is not None and image.shape[1:] != size:
            raise ValueError(f"{path} is {image.shape[1:]}, not {size}; resizing .npy arrays needs Pillow images instead")
        return image
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow is present wherever matplotlib is
        raise ImportError("reading image files needs Pillow (pip install pillow); .npy arrays work without it") from error
    with Image.open(path) as opened:
        image = opened.convert("L" if channels == 1 else "RGB")
        if size is not None and (image.height, image.width) != size:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return _to_channels(array.transpose(2, 0, 1), channels)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.shape[0] == channels:
        return image
    if channels == 1:
        return image.mean(0, keepdims=True)
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    raise ValueError(f"cannot turn {image.shape[0]} channels into {channels}")


def _load_folder(root: Path, classes: list[str], channels: int, size):
    samples = list_samples(root, classes)
    if not samples:
        raise FileNotFoundError(f"no images under {root}")
    if size is None:
        size = tuple(read_image(samples[0][0], channels, None).shape[1:])
    images = np.stack([read_image(path, channels, size) for path, _ in samples])
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return images, labels


def _guess_channels(root: Path) -> int:
    """1 if the first image is grey-scale, else 3."""
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in ARRAY_SUFFIXES:
            array = np.load(path)
            return 1 if array.ndim == 2 or array.shape[-1] == 1 else 3
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    raise FileNotFoundError(f"no images under {root}")


def load_image_folder(
    root,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> DatasetSplit:
    """The folder as a standardised ``DatasetSplit`` (same contract as ``load_digits_split``).

    ``image_size``: resize everything to it (an int means square); by default the first
    image's size. ``channels``: 1 or 3; by default 1 when the first image is grey-scale.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    channels = channels or _guess_channels(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = find_classes(root / "train")
        x_train, y_train = _load_folder(root / "train", classes, channels, size)
        x_test, y_test = _load_folder(root / "test", classes, channels, size or tuple(x_train.shape[2:]))
    else:
        from sklearn.model_selection import train_test_split

        classes = find_classes(root)
        images, labels = _load_folder(root, classes, channels, size)
        counts = np.bincount(labels, minlength=len(classes))
        stratify = labels if counts.min() >= 2 else None
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=test_fraction, stratify=stratify, random_state=seed
        )
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return DatasetSplit(
        x_train=torch.from_numpy((x_train - mean) / std).float(),
        y_train=torch.from_numpy(y_train).long(),
        x_test=torch.from_numpy((x_test - mean) / std).float(),
        y_test=torch.from_numpy(y_test).long(),
        num_classes=len(classes),
        name=root.name,
        class_names=tuple(classes),
    )
