"""``load_checkpoint`` and ``unsc-fast compare --checkpoint`` never run code from a file unless
told to (RELIABILITY 62): weights load with ``weights_only=True``; a file holding any other
Python object is refused, with a message naming it, unless ``--trust-checkpoint`` is given."""
import pathlib

import pytest
import torch

from unsc_fast.evaluation import cli, compare
from unsc_fast.evaluation.compare import UntrustedCheckpointError, build_model, load_checkpoint
from unsc_fast.evaluation.data import load_digits_split


class WritesMarker:
    """Unpickling this object writes ``marker``: a stand-in for any payload a file could carry."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "the checkpoint's payload ran")


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.fixture
def model(split):
    torch.manual_seed(0)
    return build_model("digits_cnn", split).eval()


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_plain_state_dict_and_one_under_state_dict_load(tmp_path, split, model):
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("bare.pt", "wrapped.pt"):
        assert _same_weights(load_checkpoint(str(tmp_path / name), "digits_cnn", split), model), name


def test_a_checkpoint_carrying_a_payload_is_refused_and_never_runs(tmp_path, split, model):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "extra": WritesMarker(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"refused to load checkpoint .*evil\.pt") as caught:
        load_checkpoint(str(path), "digits_cnn", split)
    assert "--trust-checkpoint" in str(caught.value) and "state_dict()" in str(caught.value)
    assert not marker.exists()


def test_the_cli_refuses_it_before_any_training(tmp_path, model, monkeypatch, capsys):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "extra": WritesMarker(marker)}, path)
    monkeypatch.setattr(compare, "train", _no_training)
    threads = torch.get_num_threads()
    try:
        code = cli.main(["compare", "--checkpoint", str(path), "--methods", "unsc", "--seeds", "0",
                         "--output", str(tmp_path / "out"), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 2
    assert "refused to load checkpoint" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _no_training(*args, **kwargs):
    raise AssertionError("training started")


def test_a_pickled_module_loads_only_with_the_opt_in(tmp_path, split, model):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UntrustedCheckpointError, match="whole.pt"):
        load_checkpoint(str(path), "digits_cnn", split)
    loaded = load_checkpoint(str(path), "digits_cnn", split, trust_pickle=True)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training and _same_weights(loaded, model)


def test_the_opt_in_is_a_documented_cli_flag():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["compare"].format_help().split())
    assert "--trust-checkpoint" in help_text and "runs any code the file names" in help_text


def test_other_contents_are_a_type_error(tmp_path, split):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="not a model or a state_dict"):
        load_checkpoint(str(tmp_path / "list.pt"), "digits_cnn", split)
