"""Loading refuses broken state and changes nothing when it does (RELIABILITY 65, issue 10.4)."""
import copy

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.projector.persistence import seal_state

from state_helpers import assert_bitwise_equal  # noqa: E402


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))


def built_projector(model, seed: int) -> NullSpaceProjector:
    torch.manual_seed(seed)
    projector = NullSpaceProjector(model, threshold=0.9)
    with projector.observe(labels=torch.tensor([0, 1, 1, 2, 0, 1])):
        model(torch.randn(6, 2, 4, 4))
    return projector.build(exclude=(2,))


def edit(state, path, value):
    """Set (or, with value=DELETE, remove) ``state[p0][p1]...``, then reseal the state (an
    edit on purpose: the checks below the checksum are what these tests are about)."""
    target = state
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    seal_state(state)


DELETE = object()
NAN = float("nan")


def with_nan(t):
    t = t.clone()
    t.view(-1)[1] = NAN
    return t


# (what is broken, where, new value, message)
BROKEN = [
    ("missing basis", ("bases", "2"), DELETE, r"bases are missing for layers \['2'\]"),
    ("basis shape", ("bases", "0"), lambda u: u[:-1], r"layer '0' basis must have shape \(18, k\)"),
    ("basis too wide", ("bases", "2"), lambda u: torch.eye(12, 13), r"layer '2' basis must have shape"),
    ("covariance shape", ("groups", 0, "covariances", "2"), lambda c: c[:-1], r"layer '2' covariance \(group 0\) must have shape \(12, 12\)"),
    ("refused dtype", ("dtype",), "float16", r"dtype must be one of \['float32', 'float64'\], got 'float16'"),
    ("unknown dtype", ("dtype",), "os.system", r"dtype must be one of"),
    ("NaN covariance", ("groups", 1, "covariances", "0"), with_nan, r"layer '0' covariance \(group 1\) has NaN or Inf"),
    ("NaN basis", ("bases", "2"), with_nan, r"layer '2' basis has NaN or Inf"),
    ("non-orthonormal basis", ("bases", "2"), lambda u: 3 * u, r"layer '2' basis is not orthonormal"),
    ("string basis", ("bases", "0"), "U", r"layer '0' basis must be a tensor, got str"),
    ("string covariance", ("groups", 0, "covariances", "0"), "C", r"layer '0' covariance \(group 0\) must be a tensor"),
    ("integer basis", ("bases", "2"), lambda u: u.long(), r"layer '2' basis must be a floating-point tensor"),
    ("half basis", ("bases", "2"), lambda u: u.half(), r"layer '2' basis must be float32 or float64, got torch.float16"),
    ("bool count", ("groups", 0, "counts", "2"), True, r"layer '2' count \(group 0\) must be a non-negative integer"),
    ("negative count", ("groups", 0, "counts", "2"), torch.tensor(-1), r"layer '2' count \(group 0\) must be a non-negative integer"),
    ("float count", ("groups", 0, "counts", "2"), torch.tensor(2.5), r"layer '2' count \(group 0\) must be a non-negative integer"),
    ("string count", ("groups", 0, "counts", "2"), "2", r"layer '2' count \(group 0\)"),
    ("count without covariance", ("groups", 0, "covariances", "2"), DELETE, r"group 0 has covariances for \['0'\] but counts for \['0', '2'\]"),
    ("negative variance", ("groups", 0, "covariances", "2"), lambda c: c - 1e6 * torch.eye(12), r"layer '2' covariance \(group 0\) has negative diagonal"),
    ("unknown layer in a group", ("groups", 0, "covariances", "9"), torch.zeros(2, 2), r"layer '9' \(group 0\): not a tracked layer"),
    ("unknown format", ("format",), "unsc_fast.NullSpaceProjector/99", r"expected format"),
    ("threshold above 1", ("threshold",), 1.5, r"threshold must be in \(0, 1\]"),
    ("threshold 0", ("threshold",), 0.0, r"threshold must be in \(0, 1\]"),
    ("threshold string", ("threshold",), "0.9", r"threshold must be a number"),
    ("built_threshold NaN", ("built_threshold",), NAN, r"built_threshold must be in"),
    ("layers not a dict", ("layers",), ["0", "2"], r"layers must be a dict"),
    ("resized layer", ("layers", "2"), 13, r"different input widths \['2'\]"),
    ("missing field", ("groups",), DELETE, r"missing fields \['groups'\]"),
    ("unknown field", ("pickle",), "x", r"unknown fields \['pickle'\]"),
    ("groups not a list", ("groups",), {"key": 0}, r"groups must be a list"),
    ("duplicate group", ("groups", 1, "key"), 0, r"group 0 appears twice"),
    ("built_from not a list", ("built_from",), 3, r"built_from must be a list"),
]


@pytest.mark.parametrize("what, path, value, message", BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_state_is_refused_and_changes_nothing(what, path, value, message, tmp_path):
    source = built_projector(small_model(), seed=1)
    state = copy.deepcopy(source.state_dict())
    edit(state, path, value)
    target = built_projector(small_model(), seed=2)
    before = copy.deepcopy(target.state_dict())
    complements = {name: q.clone() for name, q in target._complements.items()}
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert_bitwise_equal(target.state_dict(), before)
    assert list(target._complements) == list(complements)
    for name, q in complements.items():
        assert torch.equal(target._complements[name], q)
    # load() reads a file and goes through the same checks
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message):
        target.load(path)
    assert_bitwise_equal(target.state_dict(), before)


def test_not_a_dict_is_refused():
    target = built_projector(small_model(), seed=2)
    with pytest.raises(ValueError, match="expected a dict, got list"):
        target.load_state_dict([1, 2])


def test_valid_state_still_loads_exactly():
    source = built_projector(small_model(), seed=1)
    target = NullSpaceProjector(small_model())
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_bitwise_equal(target.state_dict(), source.state_dict())
    # a state saved before any build (no bases) loads too
    fresh = NullSpaceProjector(small_model())
    with fresh.observe():
        fresh.model(torch.randn(2, 2, 4, 4))
    NullSpaceProjector(small_model()).load_state_dict(fresh.state_dict())


def test_non_orthonormal_basis_would_amplify_gradients():
    """Why orthonormality is checked: G - G V V^T with V = 3U scales span(U) by -8."""
    source = built_projector(small_model(), seed=1)
    U = source.basis("2")
    G = torch.randn(4, U.shape[1]) @ U.T  # a gradient inside the protected subspace
    torch.testing.assert_close(G - G @ (3 * U) @ (3 * U).T, -8 * G)


def optimizer_for(model, projector):
    return NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), projector)


BAD_OPTIONS = [
    ({"untracked": "bogus", "project_gradients": True}, r"null_space.untracked must be one of \('freeze', 'train'\), got 'bogus'"),
    ({"untracked": "train", "project_gradients": "yes"}, r"null_space.project_gradients must be True, False or 'auto', got 'yes'"),
    ({"untracked": "train", "project_gradients": 1}, r"project_gradients must be True, False or 'auto'"),
    ({"untracked": "train"}, r"null_space must have the fields \['project_gradients', 'untracked'\]"),
    ({"untracked": "train", "project_gradients": True, "extra": 1}, r"null_space must have the fields"),
    ("freeze", r"null_space must be a dict, got str"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_optimizer_options_are_checked_before_the_inner_optimizer_loads(options, message):
    model = small_model()
    projector = built_projector(model, seed=1)
    source = optimizer_for(model, projector)
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    source.step()
    state = copy.deepcopy(source.state_dict())
    state["null_space"] = options
    target = optimizer_for(model, projector)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert_bitwise_equal(target.state_dict(), before)
    assert target.untracked == "freeze" and target.project_gradients == "auto"


def test_optimizer_state_dict_must_be_a_dict():
    model = small_model()
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        optimizer_for(model, built_projector(model, seed=1)).load_state_dict([("null_space", {})])


class SlotKinds(nn.Module):
    """An embedding (a diagonal slot: counts and a bool mask), a grouped conv (a basis per
    group, zero-padded to one width) and a Linear (dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(4, 4, 3, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        h = self.emb(tokens).transpose(1, 2).reshape(-1, 4, 3, 3)
        return self.head(self.conv(h).flatten(1))


def slot_kinds_projector(seed: int) -> NullSpaceProjector:
    torch.manual_seed(0)
    model = SlotKinds()
    projector = NullSpaceProjector(model)
    torch.manual_seed(seed)
    with projector.observe(labels=torch.tensor([0, 1, 1, 0])):
        model(torch.randint(0, 10, (4, 9)))
    return projector.build()


def grouped_not_orthonormal(padded):
    padded = padded.clone()
    padded[1, :, 0] *= 2
    return padded


SLOT_BROKEN = [
    ("mask not bool", ("bases", "emb"), lambda m: m.float(), r"layer 'emb' basis must be a bool mask of shape \(10,\)"),
    ("mask shape", ("bases", "emb"), lambda m: m[:-1], r"layer 'emb' basis must be a bool mask"),
    ("negative count", ("groups", 0, "covariances", "emb"), lambda c: c - 100, r"layer 'emb' covariance \(group 0\) has negative"),
    ("grouped shape", ("bases", "conv"), lambda u: u[0], r"layer 'conv' basis must have shape \(2, 18, k\)"),
    ("grouped not orthonormal", ("bases", "conv"), grouped_not_orthonormal, r"layer 'conv' basis \(group 1\) is not orthonormal"),
    ("grouped covariance shape", ("groups", 0, "covariances", "conv"), lambda c: c[0], r"layer 'conv' covariance \(group 0\) must have shape \(2, 18, 18\)"),
]


def test_every_slot_kind_round_trips():
    source = slot_kinds_projector(seed=1)
    target = NullSpaceProjector(SlotKinds())
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_bitwise_equal(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("what, path, value, message", SLOT_BROKEN, ids=[case[0] for case in SLOT_BROKEN])
def test_broken_slot_of_any_kind_is_refused_and_changes_nothing(what, path, value, message):
    state = copy.deepcopy(slot_kinds_projector(seed=1).state_dict())
    edit(state, path, value)
    target = slot_kinds_projector(seed=2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert_bitwise_equal(target.state_dict(), before)
