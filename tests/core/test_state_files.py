"""Saved projector states: damaged files are refused with the path and the reason, flipped bits
never load, and everything a projector holds (sketches, the rows' dtypes) resumes exactly
(issue 28.4, 28.5)."""
import copy
import re

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.projector.persistence import seal_state
from unsc_fast.projection.checksum import state_checksum
from unsc_fast.projector.state_validation import StateError

from state_helpers import assert_bitwise_equal  # noqa: E402


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))


def per_label_projector(seed: int = 1) -> NullSpaceProjector:
    projector = NullSpaceProjector(model(), threshold=0.9)
    torch.manual_seed(seed)
    with projector.observe(labels=torch.tensor([0, 1, 1, 2, 0, 1])):
        projector.model(torch.randn(6, 2, 4, 4))
    return projector.build(exclude=(2,))


def unchanged(projector, before) -> None:
    assert_bitwise_equal(projector.state_dict(), before)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "projector.pt"
    per_label_projector().save(path)
    return path, path.read_bytes()


def test_an_empty_file_is_refused_naming_the_path(tmp_path, saved):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    target = per_label_projector(seed=2)
    before = target.state_dict()
    with pytest.raises(StateError, match=re.escape(repr(str(path))) + r": the file is empty \(0 bytes\)"):
        target.load(path)
    unchanged(target, before)


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused_naming_the_path(tmp_path, saved, share):
    _, data = saved
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * share)])
    target = per_label_projector(seed=2)
    before = target.state_dict()
    with pytest.raises(StateError, match=re.escape(repr(str(path))) + r": .*(truncated or damaged|checksum)"):
        target.load(path)
    unchanged(target, before)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


NOT_STATES = {
    "text": (lambda path: path.write_text("threshold: 0.9\n"), r"not a readable torch.save file \(15 bytes; .*truncated or damaged, or was never a saved"),
    "a tensor": (lambda path: torch.save(torch.zeros(3), path), r"not a NullSpaceProjector state: expected a dict"),
    "a model's weights": (lambda path: torch.save(model().state_dict(), path), r"not a NullSpaceProjector state \(expected format"),
    "an object": (lambda path: torch.save({"format": "x", "hook": Payload()}, path),
                  r"the file holds Python objects other than tensors and plain values"),
}


@pytest.mark.parametrize("kind", sorted(NOT_STATES))
def test_a_file_that_is_not_a_state_is_refused_naming_the_path(tmp_path, kind, capsys):
    write, message = NOT_STATES[kind]
    path = tmp_path / "other.pt"
    write(path)
    target = per_label_projector(seed=2)
    before = target.state_dict()
    with pytest.raises(StateError, match=re.escape(repr(str(path))) + ": " + message):
        target.load(path)
    unchanged(target, before)
    assert "must never run" not in capsys.readouterr().out


def test_no_flipped_bit_is_installed(tmp_path, saved):
    """Every single-bit flip across the file is refused naming the path, or (a byte that
    torch.load ignores) loads the very same content: damaged content is never installed."""
    source_path, data = saved
    reference = NullSpaceProjector(model()).load(source_path).state_dict()
    path = tmp_path / "flipped.pt"
    refused = 0
    positions = range(7, len(data), max(1, len(data) // 97))
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        path.write_bytes(bytes(damaged))
        target = per_label_projector(seed=2)
        before = target.state_dict()
        try:
            target.load(path)
        except StateError as error:
            assert repr(str(path)) in str(error)
            unchanged(target, before)
            refused += 1
        else:
            assert_bitwise_equal(target.state_dict(), reference, f"flip at byte {position}")
    assert refused >= len(positions) // 2  # most bytes matter; the checksum sees every one of the content's


def test_a_flip_inside_a_tensor_is_caught_by_the_checksum(tmp_path):
    """A flip in a tensor's bytes leaves a valid zip and pickle: only the checksum sees it."""
    projector = per_label_projector()
    state = projector.state_dict()
    covariance = state["groups"][0]["covariances"]["2"]
    covariance.view(-1).view(torch.int32)[5] ^= 1  # the last bit of one float: 1 ulp
    with pytest.raises(StateError, match="does not match its checksum.*damaged"):
        per_label_projector(seed=2).load_state_dict(state)
    path = tmp_path / "flipped.pt"
    torch.save(state, path)
    with pytest.raises(StateError, match=re.escape(repr(str(path))) + ": .*does not match its checksum"):
        per_label_projector(seed=2).load(path)


def test_the_checksum_covers_every_field_and_tensor():
    state = per_label_projector().state_dict()
    sealed = state["checksum"]
    assert sealed == state_checksum(state) and sealed.startswith("sha256:")
    edits = [
        lambda s: s.__setitem__("threshold", 0.91),
        lambda s: s.__setitem__("built_from", [1, 0]),
        lambda s: s["groups"][0]["counts"]["2"].add_(1),
        lambda s: s["bases"]["2"].mul_(-1),
        lambda s: s["layers"].__setitem__("2", [12, 13]),
        lambda s: s["groups"][1].__setitem__("key", "1"),  # the label 1 as a string
        lambda s: s["bases"].__setitem__("2", s["bases"]["2"].double()),  # same values, another dtype
    ]
    for index, change in enumerate(edits):
        edited = copy.deepcopy(state)
        change(edited)
        assert state_checksum(edited) != sealed, index


def test_an_edited_state_loads_once_resealed_and_an_unsealed_one_with_a_warning():
    source = per_label_projector()
    state = source.state_dict()
    state["threshold"] = 0.5  # a deliberate edit
    with pytest.raises(StateError, match="does not match its checksum"):
        per_label_projector(seed=2).load_state_dict(state)
    assert per_label_projector(seed=2).load_state_dict(seal_state(state)).threshold == 0.5
    del state["checksum"]
    with pytest.warns(UserWarning, match="carries no checksum"):
        assert per_label_projector(seed=2).load_state_dict(state).threshold == 0.5


def test_a_state_saved_by_the_previous_version_loads_with_a_warning(tmp_path):
    """No checksum, no row dtypes, no sketches: what the version before this one saved."""
    source = per_label_projector()
    state = source.state_dict()
    for field in ("checksum", "row_dtypes", "sketches"):
        del state[field]
    path = tmp_path / "old.pt"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=re.escape(repr(str(path))) + " carries no checksum"):
        restored = NullSpaceProjector(model()).load(path)
    for name in source.layers:
        assert torch.equal(restored.basis(name), source.basis(name))
    assert restored.store.row_dtypes == {}


def sketched_projector(seed: int) -> NullSpaceProjector:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    projector = NullSpaceProjector(net, threshold=0.6, sketch={"2": 3})
    torch.manual_seed(seed)
    for _ in range(3):  # enough rows to shrink the 3-row sketch (2 x 3 buffer) several times
        with projector.observe(labels=torch.randint(0, 2, (5,))):
            net(torch.randn(5, 6))
    return projector


def test_sketches_are_saved_and_resume_bit_for_bit(tmp_path):
    source = sketched_projector(seed=1)
    path = tmp_path / "sketched.pt"
    source.save(path)
    restored = sketched_projector(seed=2).load(path)  # its own sketches are replaced, not mixed in
    assert_bitwise_equal(restored.state_dict(), source.state_dict())
    for key, per_layer in source._sketches.items():
        for name, sketch in per_layer.items():
            for twin, part in zip(restored._sketches[key][name].parts, sketch.parts, strict=True):
                assert torch.equal(twin.rows, part.rows) and (twin.l, twin.capacity) == (part.l, part.capacity)
                assert (twin.trace, twin.shrunk, twin.count) == (part.trace, part.shrunk, part.count)
    for projector in (source, restored):
        projector.build(exclude=(1,))
    assert torch.equal(restored.basis("2"), source.basis("2"))
    # the sketch rows are saved with the state: a projector constructed without sketch= adopts them
    adopted = NullSpaceProjector(source.model).load(path)
    assert adopted.sketch_rows == {"2": 3} and torch.equal(adopted.build(exclude=(1,)).basis("2"), source.basis("2"))


def test_row_dtypes_are_saved():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    projector = NullSpaceProjector(net, statistics="total")
    with projector.observe():
        net(torch.randn(3, 4, dtype=torch.bfloat16))
    restored = NullSpaceProjector(net, statistics="total").load_state_dict(projector.state_dict())
    assert restored.store.row_dtypes == {"0": torch.bfloat16, "1": torch.bfloat16}
