"""Saving and checking the sketches of a projector state (slot sketches and class sketches).

A sketched layer keeps no covariance in the store: its statistics are the per-key sketches
(``unsc_fast.statistics.sketch``), and a total's class sketches are what per-class protection
reads; a saved state without them would resume with that data gone. A sketch from a file is
checked like a covariance (``unsc_fast.projector.state_validation``): the
slot exists and can hold a sketch, one part per group, rows ``(n, d)`` of the slot's width
and no more than the buffer holds, finite values, non-negative exact energy, bound and
count, and rows holding no more energy than the trace says was fed in (a sketch only ever
loses energy: ``||B||_F^2 <= tr(A^T A)``). Nothing is installed unless all of it passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch

from unsc_fast.projector.state_validation import StateError
from unsc_fast.statistics.sketch import SlotSketch

PART_FIELDS = {"rows", "trace", "shrunk", "count", "l", "capacity"}
ENERGY_SLACK = 1e-4  # ||B||_F^2 may exceed the fp64 trace by float32 rounding of its rows


def state(sketches: dict) -> list[dict]:
    """``sketches[key][slot]`` as tensors and plain values (``torch.load(weights_only=True)``)."""
    return [{"key": key, "slots": {slot: sketch.state() for slot, sketch in per_key.items()}}
            for key, per_key in sketches.items()]


def _error(message: str) -> StateError:
    return StateError(f"projector state: {message}")


def _scalar(value, where: str, integer: bool) -> float | int:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise _error(f"{where} must be a one-element tensor, got {value!r}")
    number = value.item()
    if (integer and (value.is_floating_point() or value.dtype == torch.bool)) or not math.isfinite(number) or number < 0:
        raise _error(f"{where} must be a non-negative {'integer' if integer else 'finite number'}, got {number!r}")
    return number


def _part(entry, dim: int, where: str) -> dict:
    if not isinstance(entry, dict) or set(entry) != PART_FIELDS:
        raise _error(f"{where} must be a dict with the fields {sorted(PART_FIELDS)}")
    rows = entry["rows"]
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.dim() != 2 or rows.shape[1] != dim:
        raise _error(f"{where} rows must be a floating-point (n, {dim}) tensor, got "
                     f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    if rows.dtype not in (torch.float32, torch.float64) or not bool(torch.isfinite(rows).all()):
        raise _error(f"{where} rows must be finite float32/float64")
    l, capacity = _scalar(entry["l"], f"{where} l", True), _scalar(entry["capacity"], f"{where} capacity", True)
    if l < 1 or capacity <= l or rows.shape[0] > capacity:
        raise _error(f"{where}: {rows.shape[0]} rows for l={l} and a buffer of {capacity} (needs 1 <= l < capacity, "
                     "rows <= capacity)")
    trace = _scalar(entry["trace"], f"{where} trace", False)
    _scalar(entry["shrunk"], f"{where} shrunk", False)
    _scalar(entry["count"], f"{where} count", True)
    held = float(rows.double().square().sum())
    if held > trace * (1 + ENERGY_SLACK) + 1e-30:
        raise _error(f"{where} rows hold {held:.6g} of energy, more than the {trace:.6g} fed in (not a sketch)")
    return entry


LEGACY_FIELDS = {"matrix", "sketch_rows", "trace", "shrunk", "count"}


def _legacy(entry):
    """An entry of the earlier format (``{"key", "layers": {slot: {matrix, sketch_rows, trace,
    shrunk, count}}}``: dense Linear slots only, buffer ``2 l``) in this one's form; anything
    else unchanged (and refused by ``parse`` if it is not this format either)."""
    if not isinstance(entry, dict) or set(entry) != {"key", "layers"} or not isinstance(entry["layers"], dict):
        return entry
    slots = {}
    for name, old in entry["layers"].items():
        if not isinstance(old, dict) or set(old) != LEGACY_FIELDS or not all(
                isinstance(old[f], (int, float)) and not isinstance(old[f], bool)
                for f in ("sketch_rows", "trace", "shrunk", "count")):
            return entry
        slots[name] = [{"rows": old["matrix"], "trace": torch.tensor(old["trace"], dtype=torch.float64),
                        "shrunk": torch.tensor(old["shrunk"], dtype=torch.float64),
                        "count": torch.tensor(old["count"]),
                        "l": torch.tensor(old["sketch_rows"]),
                        "capacity": torch.tensor(2 * old["sketch_rows"])}]
    return {"key": entry["key"], "slots": slots}


def parse(entries, slots: dict, allowed: set, devices: dict, field: str) -> dict:
    """``{key: {slot: SlotSketch}}`` from ``state()`` entries (or the earlier format's);
    ``slots``: name -> (groups, d), ``allowed``: the slot names that may hold this kind of sketch."""
    if not isinstance(entries, (list, tuple)):
        raise _error(f"{field} must be a list, got {type(entries).__name__}")
    parsed: dict = {}
    for position, entry in enumerate(map(_legacy, entries)):
        if not isinstance(entry, dict) or set(entry) != {"key", "slots"} or not isinstance(entry["slots"], dict):
            raise _error(f"{field}[{position}] must be a dict with the fields key, slots")
        key = entry["key"]
        if not isinstance(key, Hashable) or isinstance(key, torch.Tensor) or key in parsed:
            raise _error(f"{field}[{position}].key must be a label or a name, once: got {key!r}")
        parsed[key] = {}
        for name, parts in entry["slots"].items():
            where = f"{field} of layer {name!r} (key {key!r})"
            if name not in allowed:
                raise _error(f"{where}: not a slot that holds this sketch here (allowed: {sorted(allowed)})")
            groups, dim = slots[name]
            if not isinstance(parts, (list, tuple)) or len(parts) != groups:
                raise _error(f"{where} must have one part per group ({groups})")
            checked = [_part(part, dim, f"{where} part {index}") for index, part in enumerate(parts)]
            parsed[key][name] = SlotSketch.from_state(checked, devices[name])
    return parsed


@dataclass
class StatisticsState:
    """The statistics fields of a checked state (absent in states saved before them)."""

    policy: str
    sketch_rows: dict
    sketches: dict
    class_rows: int
    class_sketches: dict
    forget_labels: set
    rounding: float | None


def _rows_field(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _error(f"{field} must be a non-negative int, got {value!r}")
    return value


def parse_statistics(state: dict, slots: dict[str, tuple], devices: dict, sketchable: set,
                     default_policy: str, default_sketch_rows: dict | None = None) -> StatisticsState:
    """``slots``: name -> (kind, shape of the statistics); ``sketchable``: the slots this model
    can sketch; ``default_policy`` / ``default_sketch_rows``: for a state saved before the
    policy / the sketch rows were (the loading projector's)."""
    policy = state.get("statistics", default_policy)
    if policy not in ("per_label", "total"):
        raise _error(f"statistics must be 'per_label' or 'total', got {policy!r}")
    sketch_rows = state.get("sketch_rows", dict(default_sketch_rows or {}))
    if not isinstance(sketch_rows, dict) or not set(sketch_rows) <= sketchable:
        raise _error(f"sketch_rows must map sketchable layers {sorted(sketchable)} to rows, got {sketch_rows!r}")
    sketch_rows = {name: _rows_field(rows, f"sketch_rows[{name!r}]") for name, rows in sketch_rows.items()}
    widths = {name: (shape[0] if kind == "grouped" else 1, shape[-1]) for name, (kind, shape) in slots.items()}
    dense = {name for name, (kind, _) in slots.items() if kind != "diagonal" and name not in sketch_rows}
    rounding = state.get("rounding")
    if rounding is not None and (isinstance(rounding, bool) or not isinstance(rounding, float) or not 0 < rounding < 1):
        raise _error(f"rounding must be None or a float in (0, 1), got {rounding!r}")
    forget_labels = state.get("forget_labels", [])
    if not isinstance(forget_labels, (list, tuple)) or not all(isinstance(k, Hashable) for k in forget_labels):
        raise _error(f"forget_labels must be a list of labels, got {forget_labels!r}")
    return StatisticsState(
        policy, sketch_rows, parse(state.get("sketches", []), widths, set(sketch_rows), devices, "sketches"),
        _rows_field(state.get("class_rows", 0), "class_rows"),
        parse(state.get("class_sketches", []), widths, dense if policy == "total" else set(), devices, "class_sketches"),
        set(forget_labels), rounding)
