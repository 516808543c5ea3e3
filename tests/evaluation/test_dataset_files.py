"""The paper's dataset files, written here in their real formats (a few images per class),
read back exactly; damaged files fail with errors naming the file; the CIFAR pickles are read
without ever running code. Nothing is downloaded."""
import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from unsc_fast.evaluation import dataset_files as files
from unsc_fast.evaluation.datasets import arrays_to_split, load_dataset
from unsc_fast.evaluation.safe_pickle import RefusedGlobal, load_numpy_pickle

RNG = np.random.default_rng(0)


def _images(n, channels, size):
    return RNG.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


def _labels(n, classes):
    return np.arange(n) % classes  # every class present


# ------------------------------------------------------------------ CIFAR binary

def _write_cifar10_bin(folder, per_batch=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        x, y = _images(per_batch, 3, 32), (_labels(per_batch, 10) + len(batches)) % 10
        records = np.concatenate([y[:, None].astype(np.uint8), x.reshape(per_batch, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        batches[name] = (x, y)
    (folder / "batches.meta.txt").write_text("\n".join(f"name{i}" for i in range(10)) + "\n\n")
    return batches


def test_cifar10_binary_reads_back_pixels_and_labels(tmp_path):
    batches = _write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    arrays = files.read_cifar(tmp_path, 10)  # the archive's parent folder is enough
    train = [batches[f"data_batch_{i}.bin"] for i in range(1, 6)]
    np.testing.assert_array_equal(arrays.x_train, np.concatenate([x for x, _ in train]))
    np.testing.assert_array_equal(arrays.y_train, np.concatenate([y for _, y in train]))
    np.testing.assert_array_equal(arrays.x_test, batches["test_batch.bin"][0])
    np.testing.assert_array_equal(arrays.y_test, batches["test_batch.bin"][1])
    assert arrays.class_names == tuple(f"name{i}" for i in range(10)) and arrays.num_classes == 10


def test_cifar100_binary_uses_the_fine_label_byte(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    written = {}
    for name, n in (("train.bin", 6), ("test.bin", 3)):
        x, fine = _images(n, 3, 32), np.array([99, 0, 57, 12, 3, 98][:n])
        coarse = fine // 5
        records = np.concatenate([coarse[:, None], fine[:, None], x.reshape(n, -1)], axis=1).astype(np.uint8)
        (folder / name).write_bytes(records.tobytes())
        written[name] = (x, fine, coarse)
    arrays = files.read_cifar(folder, 100)
    np.testing.assert_array_equal(arrays.x_train, written["train.bin"][0])
    np.testing.assert_array_equal(arrays.y_train, written["train.bin"][1])
    np.testing.assert_array_equal(arrays.y_test, written["test.bin"][1])
    _, coarse = files.read_cifar_bin_file(folder / "train.bin", label_bytes=2, label_index=0, num_classes=20)
    np.testing.assert_array_equal(coarse, written["train.bin"][2])


def test_cifar_binary_truncated_or_bad_labels_name_the_file(tmp_path):
    _write_cifar10_bin(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin.*whole number of 3073-byte"):
        files.read_cifar10_binary(tmp_path)
    path.write_bytes(bytes([12]) + bytes(3072))
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: labels must lie in 0\.\.9"):
        files.read_cifar10_binary(tmp_path)


def test_missing_cifar_files_list_what_was_expected(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(3073))
    with pytest.raises(FileNotFoundError) as error:
        files.read_cifar(tmp_path, 10)
    message = str(error.value)
    assert "data_batch_5.bin" in message and "test_batch.bin" in message  # the binary version's files
    assert "data_batch_5, test_batch" in message and "cifar-10-batches-py" in message  # and the python one's


# ------------------------------------------------------------------ CIFAR python

def _write_cifar_python(folder, protocol=2):
    folder.mkdir(parents=True)
    written = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x, y = _images(3, 3, 32), list(map(int, (_labels(3, 10) + index) % 10))
        batch = {b"batch_label": b"batch " + name.encode(), b"labels": y, b"data": x.reshape(3, -1),
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        written[name] = (x, np.array(y))
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, handle, protocol=protocol)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_version_reads_back(tmp_path, protocol):
    written = _write_cifar_python(tmp_path / "cifar-10-batches-py", protocol)
    arrays = files.read_cifar(tmp_path, 10)
    np.testing.assert_array_equal(arrays.x_train, np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]))
    np.testing.assert_array_equal(arrays.y_train, np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)]))
    np.testing.assert_array_equal(arrays.x_test, written["test_batch"][0])
    assert arrays.class_names == tuple(f"c{i}" for i in range(10))


def test_cifar100_python_version_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = _images(4, 3, 32)
    for name in ("train", "test"):
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": x.reshape(4, -1), b"fine_labels": [5, 99, 0, 42], b"coarse_labels": [1, 19, 4, 0]},
                        handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, handle)
    arrays = files.read_cifar(tmp_path, 100)
    np.testing.assert_array_equal(arrays.x_test, x)
    np.testing.assert_array_equal(arrays.y_train, [5, 99, 0, 42])
    assert arrays.num_classes == 100 and arrays.class_names[99] == "f99"


class _Python2StylePickler(pickle._Pickler):
    """Writes a pickle as the CIFAR python-version files were written (Python 2 cPickle,
    protocol 2): every string as a Python 2 ``str`` (BINSTRING opcodes) and numpy's rebuild
    function under its numpy 1.x name ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_string
    dispatch[str] = _save_python2_string

    def save_global(self, obj, name=None):
        if obj is np.empty(0).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def test_a_python2_written_cifar_batch_reads_back(tmp_path):
    x = _images(2, 3, 32)
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump({"data": x.reshape(2, -1), "labels": [7, 0], "batch_label": "b"})
    data = buffer.getvalue()
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
    (tmp_path / "data_batch_1").write_bytes(data)
    images, labels = files.read_cifar_python_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, [7, 0])


class _Payload:
    """Unpickling this would call ``open(marker, "w")``: a stand-in for any code a doctored file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Payload, _ShellPayload])
def test_restricted_unpickler_refuses_code_and_never_runs_it(tmp_path, payload):
    marker = tmp_path / "payload_ran"
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_python(folder)
    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload(str(marker))]}, handle)
    with pytest.raises(RefusedGlobal, match=r"data_batch_2: refused to load the global (io\.open|builtins\.open|posix\.system|nt\.system)"):
        files.read_cifar(tmp_path, 10)
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_classes_and_damaged_pickles(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": torch.zeros(2)}))
    with pytest.raises(RefusedGlobal, match=r"batch: refused to load the global torch"):
        load_numpy_pickle(path)
    path.write_bytes(pickle.dumps({b"data": np.arange(5)})[:-7])
    with pytest.raises(ValueError, match=r"batch: not a readable pickle"):
        load_numpy_pickle(path)


def test_cifar_python_batch_with_wrong_content_names_the_file(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_1: b'data' must be uint8 of shape \(N, 3072\)"):
        files.read_cifar_python_batch(path)
    path.write_bytes(pickle.dumps({b"pixels": 1}))
    with pytest.raises(ValueError, match=r"data_batch_1: expected a dict with b'data'"):
        files.read_cifar_python_batch(path)


# ------------------------------------------------------------------ SVHN

def _write_svhn(folder, n_train=12, n_test=5):
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = RNG.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # 1..10, 10 = digit 0
        savemat(folder / name, {"X": x, "y": y})
        written[name] = (x, y)
    return written


def test_svhn_mat_reads_back_with_ten_meaning_zero(tmp_path):
    written = _write_svhn(tmp_path)
    arrays = files.read_svhn(tmp_path)
    x, y = written["train_32x32.mat"]
    np.testing.assert_array_equal(arrays.x_train, x.transpose(3, 2, 0, 1))
    assert arrays.x_train[4, 1, 7, 2] == x[7, 2, 1, 4]  # (row, column, channel, sample)
    np.testing.assert_array_equal(arrays.y_train, y.ravel() % 10)
    assert arrays.y_train[9] == 0 and arrays.y_train[0] == 1
    assert arrays.x_test.shape == (5, 3, 32, 32)


def test_svhn_wrong_variables_name_the_file(tmp_path):
    from scipy.io import savemat

    _write_svhn(tmp_path)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"test_32x32\.mat: X must be \(32, 32, 3, N\)"):
        files.read_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(ValueError, match=r"test_32x32\.mat: not a readable MATLAB file"):
        files.read_svhn(tmp_path)


# ------------------------------------------------------------------ MNIST / FashionMNIST (IDX)

def _idx(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, gz, n_train=20, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), _labels(n, 10)
        for kind, data in (("images-idx3-ubyte", _idx(x, 0x00000803)), ("labels-idx1-ubyte", _idx(y, 0x00000801))):
            name = f"{prefix}-{kind}" + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
        written[prefix] = (x, y)
    return written


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_read_back_plain_and_gzipped(tmp_path, gz):
    written = _write_mnist(tmp_path / "FashionMNIST" / "raw", gz)  # torchvision's layout
    arrays = files.read_mnist(tmp_path, fashion=True)
    np.testing.assert_array_equal(arrays.x_train[:, 0], written["train"][0])
    np.testing.assert_array_equal(arrays.y_train, written["train"][1])
    np.testing.assert_array_equal(arrays.x_test[:, 0], written["t10k"][0])
    np.testing.assert_array_equal(arrays.y_test, written["t10k"][1])
    assert arrays.class_names[9] == "Ankle boot"


def test_idx_wrong_magic_and_sizes_name_the_file(tmp_path):
    _write_mnist(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros((10, 28, 28), np.uint8), 0x00000803))  # an images file in its place
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: IDX magic number 0x00000803, expected 0x00000801"):
        files.read_mnist(tmp_path)
    labels.write_bytes(_idx(np.zeros(10, np.uint8), 0x00000801)[:-3])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: the header announces \(10,\) = 10 bytes"):
        files.read_mnist(tmp_path)
    labels.write_bytes(_idx(np.zeros(7, np.uint8), 0x00000801))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: 7 labels for the 10 images"):
        files.read_mnist(tmp_path)
    labels.write_bytes(gzip.compress(_idx(np.zeros(10, np.uint8), 0x00000801))[:-6])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: damaged gzip data"):
        files.read_mnist(tmp_path)


def test_missing_idx_files_are_listed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST: expected the files train-images-idx3-ubyte\[\.gz\].*"
                                                 r"t10k-labels-idx1-ubyte\[\.gz\] in one of"):
        files.read_mnist(tmp_path)


# ------------------------------------------------------------------ into the harness

def test_file_datasets_become_standardised_float_splits(tmp_path):
    _write_svhn(tmp_path / "svhn", n_train=40, n_test=10)
    split = load_dataset("svhn", tmp_path)
    assert split.x_train.dtype == torch.float32 and split.image_shape == (3, 32, 32) and split.num_classes == 10
    means, stds = split.x_train.mean(dim=(0, 2, 3)), split.x_train.std(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.ones(3), atol=1e-4, rtol=0)
    assert split.y_train.dtype == torch.int64 and split.name == "svhn"


def test_resize_matches_the_official_fashionmnist_32x32(tmp_path):
    _write_mnist(tmp_path, gz=True)
    split = load_dataset("fashionmnist", tmp_path, image_size=32)
    assert split.image_shape == (1, 32, 32) and split.x_test.shape == (10, 1, 32, 32)


def test_file_datasets_need_a_root():
    with pytest.raises(ValueError, match="--data-root"):
        load_dataset("cifar10")


def test_arrays_to_split_uses_training_statistics_only():
    arrays = files.ImageArrays(np.full((4, 1, 2, 2), 100, np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None, None],
                               np.arange(4), np.full((1, 1, 2, 2), 255, np.uint8), np.zeros(1, np.int64), 4)
    split = arrays_to_split(arrays, "toy")
    train = arrays.x_train.astype(np.float32) / 255
    expected = (1.0 - train.mean()) / train.std(ddof=1)
    torch.testing.assert_close(split.x_test, torch.full((1, 1, 2, 2), float(expected)))
