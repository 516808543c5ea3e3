"""Sketches and class sketches survive save/load (weights_only), checked like the rest of a state:
a bad sketch is refused naming the field, and the projector is left as it was."""
import copy

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.projector.persistence import seal_state
from unsc_fast.projector.state_validation import StateError


def observed(statistics="per_label", **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 96), nn.ReLU(), nn.Linear(96, 5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(120, 3, 6, 6, generator=g), torch.arange(120) % 6
    proj = NullSpaceProjector(model, statistics=statistics, **kwargs)
    proj.collect([(x[:60], y[:60]), (x[60:], y[60:])])
    return model, proj, x, y


def sketches_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if a[key].keys() != b[key].keys():
            return False
        for slot in a[key]:
            for p, q in zip(a[key][slot].parts, b[key][slot].parts):
                if not (torch.equal(p.rows, q.rows) and (p.trace, p.shrunk, p.count, p.l, p.capacity)
                        == (q.trace, q.shrunk, q.count, q.l, q.capacity)):
                    return False
    return True


@pytest.mark.parametrize("statistics", ["per_label", "total"])
def test_sketches_round_trip_and_build_the_same_bases(tmp_path, statistics):
    model, proj, x, y = observed(statistics, sketch={"2": 8}, class_rows=5)
    proj.save(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = NullSpaceProjector(model).load_state_dict(state)  # a default projector takes the saved policy
    assert fresh.statistics == statistics and fresh.sketch_rows == {"2": 8} and fresh._class_rows == proj._class_rows
    assert sketches_equal(fresh._sketches, proj._sketches)
    assert sketches_equal(fresh._class_sketches, proj._class_sketches)
    assert bool(fresh._class_sketches) == (statistics == "total")
    if statistics == "total":
        for p in (proj, fresh):
            p.collect([(x[y == 2], y[y == 2])], forget=True)
    for p in (proj, fresh):
        p.build(exclude=(2,), generator=torch.Generator().manual_seed(0))
    for name in proj.protection.slots:
        assert torch.equal(proj.basis(name), fresh.basis(name)), name


def test_a_state_saved_before_the_statistics_fields_still_loads():
    model, proj, _, _ = observed("total")
    state = proj.state_dict()
    for field in ("statistics", "sketch_rows", "sketches", "class_rows", "class_sketches", "forget_labels", "rounding"):
        del state[field]
    fresh = NullSpaceProjector(model, statistics="per_label").load_state_dict(seal_state(state))
    assert fresh.statistics == "total"  # read from the total it holds
    assert not fresh._sketches and not fresh._class_sketches


def corrupt(state, where, change):
    state = copy.deepcopy(state)
    entry = state[where][0]
    part = next(iter(entry["slots"].values()))[0]
    change(part, entry)
    return seal_state(state)  # a consistent checksum: the field checks must refuse it


BAD = {
    "energy above the trace": (lambda part, e: part.__setitem__("rows", part["rows"] * 10), "more than the"),
    "wrong width": (lambda part, e: part.__setitem__("rows", part["rows"][:, :-1]), r"\(n, 64\)"),
    "NaN": (lambda part, e: part["rows"].view(-1)[0].fill_(float("nan")), "finite"),
    "too many rows": (lambda part, e: part.__setitem__("capacity", torch.tensor(1)), "rows <= capacity"),
    "negative trace": (lambda part, e: part.__setitem__("trace", torch.tensor(-1.0, dtype=torch.float64)),
                       "non-negative"),
    "unknown slot": (lambda part, e: e.__setitem__("slots", {"nope": e["slots"].popitem()[1]}), "'nope'"),
    "missing field": (lambda part, e: part.pop("shrunk"), "fields"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_sketch_is_refused_and_nothing_changes(case):
    change, message = BAD[case]
    model, proj, _, _ = observed(sketch={"2": 8})
    _, target, _, _ = observed(sketch={"2": 8})
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(StateError, match=message):
        target.load_state_dict(corrupt(proj.state_dict(), "sketches", change))
    after = target.state_dict()
    assert sketches_equal(target._sketches, NullSpaceProjector(model).load_state_dict(before)._sketches)
    assert after["statistics"] == before["statistics"]


def test_class_sketches_are_refused_where_this_model_keeps_none():
    model, proj, _, _ = observed("total", class_rows=4)
    state = proj.state_dict()
    state["statistics"] = "per_label"  # per-label storage keeps exact matrices, no class sketch
    with pytest.raises(StateError, match="class_sketches of layer"):
        NullSpaceProjector(model).load_state_dict(seal_state(state))
    state = proj.state_dict()
    state["sketch_rows"] = {"4": 4}  # a sketched slot keeps its own sketches, no class sketch
    with pytest.raises(StateError, match=r"class_sketches of layer '4'.*not a slot that holds"):
        NullSpaceProjector(model).load_state_dict(seal_state(state))
    state["sketch_rows"] = {"nope": 4}
    with pytest.raises(StateError, match="sketch_rows must map sketchable layers"):
        NullSpaceProjector(model).load_state_dict(seal_state(state))


def test_sketches_in_the_earlier_format_load():
    """States saved before sketches had groups kept one Frequent Directions sketch per
    (key, Linear layer) as ``{"key", "layers": {slot: {matrix, sketch_rows, trace, shrunk,
    count}}}``: they load into the same sketches."""
    model, proj, _, _ = observed("per_label", sketch={"2": 8})
    state = proj.state_dict()
    state["sketches"] = [
        {"key": entry["key"], "layers": {name: {"matrix": parts[0]["rows"], "sketch_rows": int(parts[0]["l"]),
                                                "trace": float(parts[0]["trace"]), "shrunk": float(parts[0]["shrunk"]),
                                                "count": int(parts[0]["count"])}
                                         for name, parts in entry["slots"].items()}}
        for entry in state["sketches"]]
    for field in ("statistics", "sketch_rows", "class_rows", "class_sketches", "forget_labels", "rounding"):
        del state[field]
    fresh = NullSpaceProjector(model, statistics="per_label", sketch={"2": 8}).load_state_dict(seal_state(state))
    assert fresh._sketches and sketches_equal(fresh._sketches, proj._sketches)
    state["sketches"][0]["layers"]["2"]["count"] = 1.5  # neither format: refused, naming the field
    with pytest.raises(StateError, match="count must be a non-negative integer"):
        NullSpaceProjector(model, statistics="per_label", sketch={"2": 8}).load_state_dict(seal_state(state))
