"""The image-folder loader on the files real folders hold (issue 10.7): a bad file is an error
naming it, never NaN spread over the whole dataset; hidden system files are skipped with a
warning; a class that could have no training samples is an error naming the class."""
import warnings

import numpy as np
import pytest
import torch

from unsc_fast.evaluation.image_folder import ImageFolderError, load_image_folder


def write_images(root, classes=("a", "b"), per_class=4, size=6, channels=3, seed=0):
    """PNG files whose class is a bright row, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for sample in range(per_class):
            image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            image[index, :, :] = 250
            picture = Image.fromarray(image)
            (picture if channels == 3 else picture.convert("L")).save(root / name / f"{sample:03d}.png")
    return root


def write_arrays(root, classes=("a", "b"), per_class=3, shape=(5, 6)):
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for sample in range(per_class):
            np.save(root / name / f"{sample}.npy", np.full(shape, 0.2 * index + 0.05 * sample, dtype=np.float32))
    return root


def test_a_nan_array_is_an_error_naming_it_not_a_nan_dataset(tmp_path):
    root = write_arrays(tmp_path / "arrays")
    bad = np.full((5, 6), 0.5, dtype=np.float32)
    bad[2, 3] = np.nan
    np.save(root / "b" / "1.npy", bad)
    with pytest.raises(ImageFolderError, match=r"b[/\\]1\.npy holds 1 NaN or infinite value"):
        load_image_folder(root, test_fraction=0.34)
    bad[2, 3] = np.inf
    np.save(root / "b" / "1.npy", bad)
    with pytest.raises(ImageFolderError, match=r"1\.npy holds 1 NaN or infinite"):
        load_image_folder(root, test_fraction=0.34)


def test_hidden_files_and_folders_are_skipped_with_a_warning(tmp_path):
    root = write_images(tmp_path / "pictures")
    (root / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    (root / "b" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "b" / ".thumbnails").mkdir()
    (root / "b" / ".thumbnails" / "000.png").write_bytes(b"not a picture")
    with pytest.warns(UserWarning, match=r"skipped 2 hidden file\(s\) .*\._000\.png"):
        split = load_image_folder(root, test_fraction=0.5)
    assert len(split.y_train) + len(split.y_test) == 8 and split.class_names == ("a", "b")
    assert torch.isfinite(split.x_train).all()


def test_a_hidden_first_file_does_not_decide_the_channels(tmp_path):
    root = write_images(tmp_path / "grey", channels=1)
    (root / "a" / "._000.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="hidden"):
        assert load_image_folder(root, test_fraction=0.5).image_shape == (1, 6, 6)


def test_a_truncated_image_is_an_error_naming_it(tmp_path):
    root = write_images(tmp_path / "pictures")
    path = root / "b" / "002.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageFolderError, match=r"cannot read .*b[/\\]002\.png"):
        load_image_folder(root, test_fraction=0.5)


def test_an_array_with_unusable_channels_is_an_error_naming_it(tmp_path):
    root = write_arrays(tmp_path / "arrays", shape=(5, 6, 3))
    np.save(root / "a" / "2.npy", np.zeros((5, 6, 5), dtype=np.float32))
    with pytest.raises(ImageFolderError, match=r"cannot read .*a[/\\]2\.npy: cannot turn 5 channels into 3"):
        load_image_folder(root, test_fraction=0.34)


def test_a_class_with_too_few_images_is_an_error_naming_it(tmp_path):
    root = write_images(tmp_path / "pictures", classes=("a", "b", "c"), per_class=4)
    for extra in ("001.png", "002.png", "003.png"):
        (root / "c" / extra).unlink()
    with pytest.raises(ImageFolderError, match=r"'c' \(1\) have fewer than 2 image"):
        load_image_folder(root, test_fraction=0.3)
    (root / "c" / "000.png").unlink()  # an empty class folder is a class with no images
    with pytest.raises(ImageFolderError, match=r"'c' \(0\)"):
        load_image_folder(root, test_fraction=0.3)


def test_with_train_and_test_every_class_needs_training_images(tmp_path):
    write_images(tmp_path / "split" / "train", classes=("a", "b"), per_class=2)
    write_images(tmp_path / "split" / "test", classes=("a", "b"), per_class=1)
    (tmp_path / "split" / "train" / "c").mkdir()
    (tmp_path / "split" / "test" / "c").mkdir()
    with pytest.raises(ImageFolderError, match=r"'c' \(0\) have fewer than 1 image\(s\) in .*train"):
        load_image_folder(tmp_path / "split")


def test_a_class_only_in_test_is_an_error_naming_it(tmp_path):
    write_images(tmp_path / "split" / "train", classes=("a", "b"), per_class=2)
    write_images(tmp_path / "split" / "test", classes=("a", "b", "zebra"), per_class=1)
    with pytest.raises(ImageFolderError, match=r"'zebra' are in .*test but not in .*train"):
        load_image_folder(tmp_path / "split")


def test_a_class_without_test_images_loads_with_a_warning(tmp_path):
    write_images(tmp_path / "split" / "train", classes=("a", "b"), per_class=2)
    write_images(tmp_path / "split" / "test", classes=("a",), per_class=1)
    with pytest.warns(UserWarning, match=r"'b' have no folder in .*test"):
        split = load_image_folder(tmp_path / "split")
    assert split.class_names == ("a", "b") and split.y_test.tolist() == [0]


def test_a_clean_folder_loads_without_warnings(tmp_path):
    root = write_images(tmp_path / "pictures")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = load_image_folder(root, test_fraction=0.5)
    assert torch.bincount(split.y_train).tolist() == [2, 2]
