"""``unsc-fast compare --dataset/--data-root``: dataset choice, the default model per dataset,
``--data DIR`` as the image-folder alias, and a run on a tiny CIFAR-10 binary folder."""
import argparse
import json

import numpy as np
import pytest
import torch

from unsc_fast.evaluation import cli
from unsc_fast.evaluation.compare import CompareConfig, dataset_choice
from unsc_fast.evaluation.datasets import DATASETS


def _args(**kwargs):
    return argparse.Namespace(**{"dataset": None, "data_root": None, "data": None, **kwargs})


def test_dataset_choice_and_the_data_alias():
    assert dataset_choice(_args()) == ("digits", None)
    assert dataset_choice(_args(dataset="cifar10", data_root="d")) == ("cifar10", "d")
    assert dataset_choice(_args(data="imgs")) == ("folder", "imgs")
    assert dataset_choice(_args(dataset="folder", data="imgs")) == ("folder", "imgs")
    with pytest.raises(SystemExit, match="--data DIR is the image folder"):
        dataset_choice(_args(dataset="svhn", data="imgs"))
    with pytest.raises(SystemExit, match="--dataset cifar100 reads local files: give --data-root DIR"):
        dataset_choice(_args(dataset="cifar100"))


@pytest.mark.parametrize("dataset,model", [("digits", "digits_cnn"), ("mnist1d", "mnist1d_cnn"),
                                           ("cifar10", "allcnn"), ("cifar100", "resnet18"), ("svhn", "vgg11"),
                                           ("fashionmnist", "alexnet"), ("mnist", "alexnet"), ("folder", "digits_cnn")])
def test_default_model_per_dataset(dataset, model):
    assert CompareConfig(dataset=dataset).model == model
    assert CompareConfig(dataset=dataset, model="resnet18").model == "resnet18"


def test_old_data_config_means_the_image_folder():
    config = CompareConfig(data="imgs")
    assert (config.dataset, config.data_root, config.model) == ("folder", "imgs", "digits_cnn")
    with pytest.raises(ValueError, match="image-folder path"):
        CompareConfig(data="imgs", dataset="cifar10")


def test_cli_offers_every_dataset():
    assert set(cli.DATASET_NAMES) == set(DATASETS)


@pytest.mark.slow  # ~10-17 s on a shared 2-core machine: original, retrain and fine-tune, plus the attacks
def test_compare_reads_a_cifar10_binary_folder(tmp_path):
    """Tiny CIFAR-10 (binary version, 2 images per class per batch) through the whole runner,
    with the small digits CNN so that it stays fast."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.repeat(np.arange(10, dtype=np.uint8), 2)
        pixels = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
    output = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        code = cli.main(["compare", "--dataset", "cifar10", "--data-root", str(tmp_path), "--model", "digits_cnn",
                         "--train-epochs", "1", "--seeds", "0", "--methods", "finetune",
                         "--set", "finetune.epochs=1", "--output", str(output), "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((output / "comparison.json").read_text())
    assert results["dataset"] == {**results["dataset"], "name": "cifar10", "train": 100, "test": 20,
                                  "image_shape": [3, 32, 32], "num_classes": 10}
    assert results["config"]["dataset"] == "cifar10" and results["config"]["model"] == "digits_cnn"
