"""Saving and checking the Frequent Directions sketches of a projector's sketched layers.

A sketched layer keeps no covariance in the store: its statistics are the per-key sketches
(``unsc_fast.statistics.sketch``). A saved state without them would resume with those layers' data gone
(the next build fails, or uses whatever the loading projector held). Checked whole before
anything is installed, like the rest of the state (``unsc_fast.projector.state_validation``).
"""
from __future__ import annotations

import math
from typing import Hashable

import torch

from unsc_fast.statistics.sketch import FrequentDirections
from unsc_fast.projector.state_validation import StateError

SKETCH_DTYPE = torch.float64
FIELDS = {"matrix", "sketch_rows", "trace", "shrunk", "count"}


def sketches_state(sketches: dict) -> list[dict]:
    """One entry per key: ``{"key": key, "layers": {slot: FrequentDirections.state()}}``."""
    return [{"key": key, "layers": {name: sketch.state() for name, sketch in per_layer.items()}}
            for key, per_layer in sketches.items()]


def _number(value, where: str, integer: bool) -> float | int:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < 0:
        kind = "a non-negative integer" if integer else "a finite non-negative number"
        raise StateError(f"projector state: {where} must be {kind}, got {value!r}")
    return value if integer else float(value)


def _parse_sketch(entry, where: str, dim: int, rows: int, device) -> FrequentDirections:
    if not isinstance(entry, dict) or set(entry) != FIELDS:
        got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise StateError(f"projector state: {where} must have the fields {sorted(FIELDS)}, got {got}")
    matrix = entry["matrix"]
    if not isinstance(matrix, torch.Tensor) or matrix.dtype != SKETCH_DTYPE or matrix.dim() != 2:
        raise StateError(f"projector state: {where} matrix must be a 2-D float64 tensor")
    if entry["sketch_rows"] != rows or isinstance(entry["sketch_rows"], bool):
        raise StateError(f"projector state: {where} has {entry['sketch_rows']!r} sketch rows, this projector {rows}")
    if matrix.shape[1] != dim or matrix.shape[0] > 2 * rows:
        raise StateError(f"projector state: {where} matrix must be (<= {2 * rows}, {dim}), got {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise StateError(f"projector state: {where} matrix has NaN or Inf entries")
    trace = _number(entry["trace"], f"{where} trace", integer=False)
    shrunk = _number(entry["shrunk"], f"{where} shrunk", integer=False)
    count = _number(entry["count"], f"{where} count", integer=True)
    return FrequentDirections.restore(matrix, rows, trace, shrunk, count, device)


def parse_sketches(entries, sketched: dict[str, tuple[int, int]], devices: dict) -> dict:
    """``{key: {slot: FrequentDirections}}`` from ``sketches_state`` entries, for a projector
    whose sketched slots are ``{slot: (width, sketch rows)}``; raises ``StateError``."""
    if not isinstance(entries, (list, tuple)):
        raise StateError(f"projector state: sketches must be a list, got {type(entries).__name__}")
    parsed: dict = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"key", "layers"} or not isinstance(entry["layers"], dict):
            raise StateError(f"projector state: sketches[{position}] must be a dict with the fields key, layers")
        key = entry["key"]
        if not isinstance(key, Hashable) or isinstance(key, torch.Tensor) or key in parsed:
            raise StateError(f"projector state: sketches[{position}].key {key!r} is not a new label or name")
        parsed[key] = {}
        for name, sketch in entry["layers"].items():
            if name not in sketched:
                raise StateError(f"projector state: layer {name!r} has a sketch (key {key!r}) but this projector "
                                 f"sketches {sorted(sketched)}: construct it with the same sketch=")
            where = f"layer {name!r} sketch (key {key!r})"
            parsed[key][name] = _parse_sketch(sketch, where, *sketched[name], devices[name])
    return parsed
