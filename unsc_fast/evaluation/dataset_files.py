"""Readers for the paper's datasets in the files their authors distribute, from a local folder.

Nothing here downloads: point ``--data-root`` at the unpacked archive. Each reader returns
``ImageArrays`` (uint8 images ``(N, C, H, W)``, int64 labels, class names when the files carry
them) and fails with an error naming the file when one is missing, truncated or not in the
format (wrong magic number, wrong size, labels out of range).

Formats (each as distributed):

* CIFAR-10 binary ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``_5.bin``, ``test_batch.bin``;
  records of 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32).
* CIFAR-100 binary ``cifar-100-binary/``: ``train.bin``, ``test.bin``; records of 1 coarse label
  byte, 1 fine label byte, 3072 pixel bytes.
* CIFAR python ``cifar-10-batches-py/`` (``data_batch_1`` .. ``test_batch``) and
  ``cifar-100-python/`` (``train``, ``test``): pickled dicts with ``b"data"`` (N x 3072 uint8) and
  ``b"labels"`` / ``b"fine_labels"``, read by ``safe_pickle`` (numpy arrays only, never code).
* SVHN ``train_32x32.mat``, ``test_32x32.mat``: ``X`` (32, 32, 3, N), ``y`` in 1..10, 10 = digit 0.
* MNIST / FashionMNIST IDX: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``; big-endian
  header, magic 0x00000803 (images) / 0x00000801 (labels).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unsc_fast.evaluation.safe_pickle import load_numpy_pickle

CIFAR_PIXELS = 3 * 32 * 32
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


@dataclass
class ImageArrays:
    """A dataset as read from its files: uint8 ``(N, C, H, W)`` images, int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None


def find_folder(root, subfolders: tuple[str, ...], required: tuple[str, ...], what: str) -> Path:
    """The first of ``root`` and ``root/<subfolder>`` holding every ``required`` file (a name
    ending in ``[.gz]`` may also be gzipped); else an error listing what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: data root {root} is not a folder")
    for folder in (root, *(root / sub for sub in subfolders)):
        if all(_existing(folder, name) is not None for name in required):
            return folder
    places = ", ".join(str(p) for p in (root, *(root / sub for sub in subfolders)))
    raise FileNotFoundError(f"{what}: expected the files {', '.join(required)} in one of: {places}")


def _existing(folder: Path, name: str) -> Path | None:
    if name.endswith("[.gz]"):
        plain = folder / name[: -len("[.gz]")]
        for candidate in (plain, plain.with_name(plain.name + ".gz")):
            if candidate.is_file():
                return candidate
        return None
    return folder / name if (folder / name).is_file() else None


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _read_names(path: Path) -> tuple[str, ...] | None:
    """One class name a line (the binary versions' ``*.txt``), blank lines ignored; None if absent."""
    if not path.is_file():
        return None
    return tuple(line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())


# ---------------------------------------------------------------- CIFAR binary version

def read_cifar_bin_file(path, label_bytes: int = 1, label_index: int = 0, num_classes: int = 10):
    """Images ``(N, 3, 32, 32)`` and labels from one CIFAR binary file of records of
    ``label_bytes`` label bytes (label ``label_index`` of them is returned) + 3072 pixel bytes."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records "
                         "(truncated, or not a CIFAR binary file?)")
    records = raw.reshape(-1, record)
    labels = _check_labels(records[:, label_index], num_classes, path)
    return records[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), labels


def read_cifar10_binary(root) -> ImageArrays:
    names = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
    folder = find_folder(root, ("cifar-10-batches-bin",), names, "CIFAR-10 (binary version)")
    parts = [read_cifar_bin_file(folder / name) for name in names]
    return ImageArrays(np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]]),
                       parts[5][0], parts[5][1], 10, _read_names(folder / "batches.meta.txt"))


def read_cifar100_binary(root) -> ImageArrays:
    folder = find_folder(root, ("cifar-100-binary",), ("train.bin", "test.bin"), "CIFAR-100 (binary version)")
    x_train, y_train = read_cifar_bin_file(folder / "train.bin", label_bytes=2, label_index=1, num_classes=100)
    x_test, y_test = read_cifar_bin_file(folder / "test.bin", label_bytes=2, label_index=1, num_classes=100)
    return ImageArrays(x_train, y_train, x_test, y_test, 100, _read_names(folder / "fine_label_names.txt"))


# ---------------------------------------------------------------- CIFAR python version

def read_cifar_python_batch(path, label_key: bytes = b"labels", num_classes: int = 10):
    """Images ``(N, 3, 32, 32)`` and labels from one pickled CIFAR batch (restricted unpickler)."""
    path = Path(path)
    batch = load_numpy_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and {label_key!r}, found {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, {CIFAR_PIXELS}), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {label_key!r} holds {labels.size} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32).copy(), _check_labels(labels, num_classes, path)


def _pickled_names(path: Path, key: bytes) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    meta = load_numpy_pickle(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names) if names is not None else None


def read_cifar10_python(root) -> ImageArrays:
    names = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    folder = find_folder(root, ("cifar-10-batches-py",), names, "CIFAR-10 (python version)")
    parts = [read_cifar_python_batch(folder / name) for name in names]
    return ImageArrays(np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]]),
                       parts[5][0], parts[5][1], 10, _pickled_names(folder / "batches.meta", b"label_names"))


def read_cifar100_python(root) -> ImageArrays:
    folder = find_folder(root, ("cifar-100-python",), ("train", "test"), "CIFAR-100 (python version)")
    x_train, y_train = read_cifar_python_batch(folder / "train", b"fine_labels", 100)
    x_test, y_test = read_cifar_python_batch(folder / "test", b"fine_labels", 100)
    return ImageArrays(x_train, y_train, x_test, y_test, 100, _pickled_names(folder / "meta", b"fine_label_names"))


def read_cifar(root, num_classes: int) -> ImageArrays:
    """CIFAR-10 or -100 from ``root``: the binary version if its files are there, else the python one."""
    binary, python = ((read_cifar10_binary, read_cifar10_python) if num_classes == 10
                      else (read_cifar100_binary, read_cifar100_python))
    try:
        return binary(root)
    except FileNotFoundError as binary_missing:
        try:
            return python(root)
        except FileNotFoundError as python_missing:
            raise FileNotFoundError(f"{binary_missing}; or {python_missing}") from None


# ---------------------------------------------------------------- SVHN

def read_svhn_mat(path):
    """Images ``(N, 3, 32, 32)`` and labels 0..9 from one SVHN ``*_32x32.mat`` (label 10 is digit 0)."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        content = loadmat(path)
    except Exception as error:  # scipy raises several types for a damaged file
        raise ValueError(f"{path}: not a readable MATLAB file ({type(error).__name__}: {error})") from error
    if "X" not in content or "y" not in content:
        raise ValueError(f"{path}: expected variables X and y, found {sorted(k for k in content if not k.startswith('__'))}")
    images, labels = np.asarray(content["X"]), np.asarray(content["y"]).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
        raise ValueError(f"{path}: X must be (32, 32, 3, N) with N = len(y) = {labels.size}, got {images.shape}")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"{path}: SVHN labels must lie in 1..10, found {labels.min()}..{labels.max()}")
    return (np.ascontiguousarray(images.transpose(3, 2, 0, 1)).astype(np.uint8),
            (labels.astype(np.int64) % 10))


def read_svhn(root) -> ImageArrays:
    folder = find_folder(root, ("svhn", "SVHN"), ("train_32x32.mat", "test_32x32.mat"), "SVHN (format 2, 32x32)")
    x_train, y_train = read_svhn_mat(folder / "train_32x32.mat")
    x_test, y_test = read_svhn_mat(folder / "test_32x32.mat")
    return ImageArrays(x_train, y_train, x_test, y_test, 10, tuple(map(str, range(10))))


# ---------------------------------------------------------------- MNIST / FashionMNIST (IDX)

IDX_UBYTE = 0x08


def read_idx(path, ndim: int) -> np.ndarray:
    """A uint8 IDX array of ``ndim`` dimensions (magic ``0x000008xx``, big-endian uint32 sizes);
    ``path`` may be gzipped (read by its first two bytes, not its name)."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: damaged gzip data ({error})") from error
    expected_magic = (IDX_UBYTE << 8) | ndim
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                         f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(data) != header + size:
        raise ValueError(f"{path}: the header announces {dims} = {size} bytes of data, the file holds "
                         f"{len(data) - header} (truncated or padded)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_pair(images_path, labels_path, num_classes: int = 10):
    """Images ``(N, 1, H, W)`` and labels from an IDX images file and its labels file."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} images of {images_path}")
    return images[:, None], _check_labels(labels, num_classes, Path(labels_path))


MNIST_FILES = ("train-images-idx3-ubyte[.gz]", "train-labels-idx1-ubyte[.gz]",
               "t10k-images-idx3-ubyte[.gz]", "t10k-labels-idx1-ubyte[.gz]")


def read_mnist(root, fashion: bool = False) -> ImageArrays:
    """MNIST or FashionMNIST from its four IDX files (plain or gzipped) in ``root``, ``root/raw``
    or torchvision's ``root/MNIST/raw`` / ``root/FashionMNIST/raw``."""
    name = "FashionMNIST" if fashion else "MNIST"
    folder = find_folder(root, ("raw", f"{name}/raw", name), MNIST_FILES, name)
    paths = [_existing(folder, file) for file in MNIST_FILES]
    x_train, y_train = read_idx_pair(paths[0], paths[1])
    x_test, y_test = read_idx_pair(paths[2], paths[3])
    names = FASHION_MNIST_CLASSES if fashion else tuple(map(str, range(10)))
    return ImageArrays(x_train, y_train, x_test, y_test, 10, names)
