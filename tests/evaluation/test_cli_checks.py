"""``unsc-fast compare`` checks its arguments before any training (issue 10.6): an output that
cannot be written, a missing checkpoint or data directory, an empty seed list fail at once, with
exit status 2 and a message naming the path, instead of after the whole run."""
import os

import pytest
import torch

from unsc_fast.evaluation import cli, compare
from unsc_fast.evaluation.compare import CompareConfig, ConfigError, check_config, run_comparison


@pytest.fixture
def no_training(monkeypatch):
    """Every way the run could start work raises: the original's training, data loading, methods."""
    calls = []

    def refuse(name):
        def stub(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the arguments were checked")
        return stub

    monkeypatch.setattr(compare, "train", refuse("train"))
    monkeypatch.setattr(compare, "load_data", refuse("load_data"))
    monkeypatch.setattr(compare, "get_method", _checked_only(compare.get_method, refuse("a method")))
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)  # the CLI sets one thread on the digits


def _checked_only(get_method, refuse):
    """``get_method`` for reading settings, but calling a method (running it) is refused."""
    def wrapped(name):
        method = get_method(name)
        return type("Unrunnable", (), {"__getattr__": lambda self, key: getattr(method, key),
                                       "__call__": lambda self, *a, **k: refuse()})()
    return wrapped


def _compare(*arguments):
    return cli.main(["compare", "--methods", "unsc", "--seeds", "0", "--quiet", *arguments])


def test_an_output_that_is_a_file_fails_before_training(tmp_path, no_training, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    assert _compare("--output", str(taken)) == 2
    error = capsys.readouterr().err
    assert f"output {taken} exists and is not a directory" in error
    assert no_training == [] and taken.read_text() == "keep me"


def test_an_output_under_a_file_fails_before_training(tmp_path, no_training, capsys):
    (tmp_path / "file").write_text("")
    assert _compare("--output", str(tmp_path / "file" / "out")) == 2
    assert "is not a directory" in capsys.readouterr().err and no_training == []


def test_a_missing_checkpoint_or_data_dir_fails_before_training(tmp_path, no_training, capsys):
    assert _compare("--checkpoint", str(tmp_path / "gone.pt"), "--output", str(tmp_path / "a")) == 2
    assert f"checkpoint {tmp_path / 'gone.pt'} is not a file" in capsys.readouterr().err
    assert _compare("--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "b")) == 2
    assert f"data directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert no_training == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_problem_is_listed_at_once(tmp_path):
    (tmp_path / "out").write_text("")
    config = CompareConfig(seeds=(), checkpoint=str(tmp_path / "gone.pt"), output=str(tmp_path / "out"))
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    message = str(caught.value)
    assert "no seeds" in message and "gone.pt is not a file" in message and "is not a directory" in message


@pytest.mark.parametrize("change, message", [
    (dict(seeds=()), "no seeds"),
    (dict(forget_classes=()), "at least one class"),
    (dict(scenario="random_sample", forget_fraction=1.5), "--forget-fraction must be in"),
    (dict(train_epochs=0), "--train-epochs must be at least 1"),
    (dict(image_size=0), "--image-size must be positive"),
])
def test_values_that_mean_nothing_are_refused_by_the_api_too(tmp_path, no_training, change, message):
    with pytest.raises(ConfigError, match=message):
        run_comparison(CompareConfig(methods=("unsc",), output=str(tmp_path / "out"), **change))
    assert no_training == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_fails_before_training(tmp_path, no_training, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _compare("--output", str(locked / "out")) == 2
    finally:
        locked.chmod(0o700)
    assert "no write permission" in capsys.readouterr().err and no_training == []


def test_a_good_configuration_passes(tmp_path):
    check_config(CompareConfig(output=str(tmp_path / "new" / "deeper"), save_original=str(tmp_path / "new" / "o.pt")))
    assert not (tmp_path / "new").exists()  # checking creates nothing
