"""MNIST-1D generated locally by the mnist1d package (never downloaded), and ``unsc-fast
compare --dataset mnist1d`` end to end."""
import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")

from unsc_fast.evaluation import cli  # noqa: E402
from unsc_fast.evaluation.mnist1d_data import load_mnist1d_split  # noqa: E402


@pytest.fixture(scope="module")
def standard():
    return load_mnist1d_split()


def test_standard_split_shapes_and_classes(standard):
    assert standard.x_train.shape == (4000, 1, 40) and standard.x_test.shape == (1000, 1, 40)
    assert standard.x_train.dtype == torch.float32 and standard.num_classes == 10
    assert set(standard.y_train.tolist()) == set(range(10)) == set(standard.y_test.tolist())
    assert abs(float(standard.x_train.mean())) < 1e-4 and abs(float(standard.x_train.std()) - 1) < 1e-3


def test_generation_is_deterministic_per_seed_and_leaves_global_rngs_alone():
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    first = load_mnist1d_split(seed=3, num_samples=200)
    assert (random.random(), np.random.rand()) == expected
    again = load_mnist1d_split(seed=3, num_samples=200)
    other = load_mnist1d_split(seed=4, num_samples=200)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)


def test_loading_never_downloads(monkeypatch):
    """The package's get_dataset downloads; only make_dataset may be used."""
    import mnist1d.data

    def refuse(*args, **kwargs):
        raise AssertionError("get_dataset (download path) was called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)
    monkeypatch.setattr(mnist1d.data.requests, "get", refuse)
    assert load_mnist1d_split(num_samples=100).num_classes == 10


@pytest.mark.slow  # ~12 s: trains the original and the retrained MLP one epoch each
def test_compare_on_mnist1d_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    try:
        code = cli.main(["compare", "--dataset", "mnist1d", "--train-epochs", "1", "--seeds", "0",
                         "--methods", "unsc,finetune", "--set", "unsc.epochs=1", "--set", "finetune.epochs=1",
                         "--output", str(tmp_path), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((tmp_path / "comparison.json").read_text())
    assert results["dataset"]["name"] == "mnist1d" and results["dataset"]["image_shape"] == [1, 40]
    assert results["config"]["model"] == "mnist1d_cnn"  # Conv1d layers are tracked
    assert set(results["runs"]) == {"retrain", "unsc", "finetune", "original"}
