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

What is skipped and what is an error (a bad file must never spoil the data silently):

- Hidden files and folders (names starting with ``.``: macOS ``._*`` and ``.DS_Store``,
  editors' backups) are skipped with one warning that counts them; other files whose suffix
  is not an image or ``.npy`` are ignored.
- A file that cannot be read (truncated, not an image, an array with NaN/Inf values or a
  channel count that cannot become the dataset's) is an ``ImageFolderError`` naming it.
- Every class needs training images: without ``train/``/``test/``, at least two per class
  (one for each side of the split); with them, at least one in ``train/``. A class folder
  only in ``test/`` is an error (its index would not exist in training); a class without
  test images is allowed with a warning (its test accuracy is undefined).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from unsc_fast.evaluation.data import DatasetSplit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
ARRAY_SUFFIXES = {".npy"}


class ImageFolderError(ValueError):
    """A file or class of the image folder that cannot be used; the message names it."""


def _is_hidden(path: Path, root: Path) -> bool:
    """True for a file or folder whose name, or any folder's under ``root``, starts with '.'."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _data_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(visible image/array files, hidden ones) under ``root``, each sorted."""
    visible, hidden = [], []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES:
            (hidden if _is_hidden(path, root) else visible).append(path)
    return visible, hidden


def _warn_hidden(root: Path, hidden: list[Path]) -> None:
    """One warning per folder for skipped hidden files (system files, never samples)."""
    if hidden:
        warnings.warn(f"skipped {len(hidden)} hidden file(s) under {root} (e.g. {hidden[0].name}): names "
                      f"starting with '.' are system files such as macOS '._*' and '.DS_Store'", stacklevel=3)


def find_classes(root: Path) -> list[str]:
    """Sorted names of the class sub-folders (hidden folders are ignored)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    return classes


def list_samples(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, class index) for every visible image or array file under each class folder, sorted."""
    samples, hidden = [], []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        visible, skipped = _data_files(folder)
        samples += [(path, index) for path in visible]
        hidden += skipped
    _warn_hidden(root, hidden)
    return samples


def read_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One file as a (channels, H, W) float32 array in [0, 1]."""
    if path.suffix.lower() in ARRAY_SUFFIXES:
        array = np.load(path, allow_pickle=False).astype(np.float32)
        if not np.isfinite(array).all():  # one NaN would turn every image NaN through the statistics
            raise ImageFolderError(f"{path} holds {int((~np.isfinite(array)).sum())} NaN or infinite value(s)")
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


def read_named(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """``read_image``, with any failure (Pillow's "image file is truncated", a bad channel
    count) re-raised as an ``ImageFolderError`` that names the file: in a folder of
    thousands, an error without the name cannot be acted on."""
    try:
        return read_image(path, channels, size)
    except ImageFolderError:
        raise
    except (OSError, ValueError, SyntaxError) as error:  # Pillow and numpy's ways of saying "bad file"
        message = str(error) if str(path) in str(error) else f"cannot read {path}: {error}"
        raise ImageFolderError(message) from error


def _load_folder(root: Path, classes: list[str], channels: int, size):
    samples = list_samples(root, classes)
    if not samples:
        raise FileNotFoundError(f"no images under {root}")
    if size is None:
        size = tuple(read_named(samples[0][0], channels, None).shape[1:])
    images = np.stack([read_named(path, channels, size) for path, _ in samples])
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return images, labels


def _guess_channels(root: Path) -> int:
    """1 if the first visible image is grey-scale, else 3."""
    visible, _ = _data_files(root)
    if not visible:
        raise FileNotFoundError(f"no images under {root}")
    path = visible[0]
    try:
        if path.suffix.lower() in ARRAY_SUFFIXES:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return 1 if array.ndim == 2 or array.shape[-1] == 1 else 3
        from PIL import Image

        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageFolderError(f"cannot read {path}: {error}") from error


def _check_train_classes(labels: np.ndarray, classes: list[str], minimum: int, where: str) -> None:
    """Every class needs ``minimum`` images in ``where``; name the ones that fall short."""
    counts = np.bincount(labels, minlength=len(classes))
    short = [f"'{name}' ({count})" for name, count in zip(classes, counts) if count < minimum]
    if short:
        raise ImageFolderError(f"class(es) {', '.join(short)} have fewer than {minimum} image(s) in {where}; "
                               f"each class needs {minimum} to have training samples: add images or remove the folder")


def _split_classes(root: Path) -> list[str]:
    """The classes of ``train/``; a class folder only in ``test/`` is an error, one only in
    ``train/`` a warning (no test images, so its test accuracy is undefined)."""
    train, test = find_classes(root / "train"), find_classes(root / "test")
    only_test = sorted(set(test) - set(train))
    if only_test:
        raise ImageFolderError(f"class(es) {', '.join(map(repr, only_test))} are in {root / 'test'} but not in "
                               f"{root / 'train'}: a model cannot learn a class it never trains on; add training "
                               f"images or remove the test folder(s)")
    only_train = sorted(set(train) - set(test))
    if only_train:
        warnings.warn(f"class(es) {', '.join(map(repr, only_train))} have no folder in {root / 'test'}: "
                      f"their test accuracy is undefined", stacklevel=3)
    return train


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
        classes = _split_classes(root)
        x_train, y_train = _load_folder(root / "train", classes, channels, size)
        _check_train_classes(y_train, classes, 1, str(root / "train"))
        x_test, y_test = _load_folder(root / "test", classes, channels, size or tuple(x_train.shape[2:]))
    else:
        from sklearn.model_selection import train_test_split

        classes = find_classes(root)
        images, labels = _load_folder(root, classes, channels, size)
        _check_train_classes(labels, classes, 2, str(root))
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=test_fraction, stratify=labels, random_state=seed
        )
        _check_train_classes(y_train, classes, 1, f"the training part of the split of {root}")
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
