"""Checks a saved projector state completely before any of it is installed.

A projector state comes from a file, so it can be truncated, edited, saved by another
version or built for another model. Installing it half-way, or installing a basis that is
not orthonormal (``G - G U U^T`` then *amplifies* gradients instead of removing a subspace:
one such basis grew a gradient norm from 328 to 1.36e6), corrupts every later step
silently. So ``parse_projector_state`` checks every field (names, shapes, dtypes,
finiteness, orthonormality, counts, thresholds) and returns new objects only; the projector
assigns them after it returns, which makes a load all or nothing. Every message names the
field, and the layer where there is one (RELIABILITY 65).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Hashable

import torch

from unsc_fast.projection.checksum import CHECKSUM_FIELD, ChecksumError, state_checksum
from unsc_fast.statistics.factored import FactoredSum

ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
REQUIRED_FIELDS = ("format", "threshold", "dtype", "layers", "groups", "bases", "built_from", "built_threshold")
# Fields that older states lack: complements (a QR rebuilds them), the rows' dtypes (taken as
# float32 by build()'s definiteness check), the sketches of sketched layers, the checksum.
OPTIONAL_FIELDS = ("complements", "row_dtypes", "sketches", CHECKSUM_FIELD)
# The statistics fields (policy, sketch rows, class sketches, labels with a forget pass, the
# sums' rounding; checked by ``unsc_fast.projector.sketch_state``) came later too.
STATISTICS_FIELDS = ("statistics", "sketch_rows", "class_rows", "class_sketches", "forget_labels", "rounding")
ROW_DTYPES = {name: getattr(torch, name) for name in
              ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")}

# Largest |U^T U - I| entry accepted, per basis dtype. Bases come out of eigh / Rayleigh-Ritz
# orthonormal to a few ulps times sqrt(d); these bounds leave room for that (and for a
# float32 U^T U computed here) while refusing anything that is not a projection basis.
ORTHONORMALITY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8}


class StateError(ValueError):
    """A projector or optimizer state that cannot be loaded; the message says where."""


@dataclass
class ProjectorState:
    """A checked state, converted and placed on each layer's device, not yet installed."""

    threshold: float
    dtype: torch.dtype
    matrices: dict
    rows: dict
    bases: dict
    built_from: tuple
    built_threshold: float | None
    complements: dict
    row_dtypes: dict


def check_threshold_field(value, field: str) -> float:
    """A number in (0, 1] (a bool or a string is not a threshold)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StateError(f"projector state: {field} must be a number in (0, 1], got {type(value).__name__}")
    if not 0.0 < float(value) <= 1.0 or math.isnan(float(value)):
        raise StateError(f"projector state: {field} must be in (0, 1], got {value!r}")
    return float(value)


def _tensor(value, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise StateError(f"projector state: {where} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point() or value.is_complex():
        raise StateError(f"projector state: {where} must be a floating-point tensor, got {value.dtype}")
    if value.device.type == "meta":
        raise StateError(f"projector state: {where} is a meta tensor (no values)")
    if not bool(torch.isfinite(value).all()):
        raise StateError(f"projector state: {where} has NaN or Inf entries")
    return value


def _count(value, where: str) -> int:
    """Row counts are saved as 0-d int64 tensors; plain ints are accepted too."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"projector state: {where} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise StateError(f"projector state: {where} must be a non-negative integer, got {value}")
    return value


def _mapping(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise StateError(f"projector state: {field} must be a dict, got {type(value).__name__}")
    return value


def _check_layer_shapes(saved: dict, shapes: dict[str, tuple]) -> None:
    """``layers`` maps each slot to the shape of its statistics; an older state saved one
    int width per layer, read as ``(d, d)``."""
    found = {}
    for name, shape in saved.items():
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape, shape)
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise StateError(f"projector state: layers[{name!r}] must be a shape (non-negative ints), got {shape!r}")
        found[name] = tuple(shape)
    if found != shapes:
        missing = sorted(set(shapes) - set(found))
        extra = sorted(set(found) - set(shapes))
        resized = sorted(n for n in set(shapes) & set(found) if shapes[n] != found[n])
        raise StateError(
            f"projector state does not fit this model: missing layers {missing}, unknown layers "
            f"{extra}, different input widths {resized}"
        )


def _parse_groups(entries, shapes: dict[str, tuple], dtype: torch.dtype, devices: dict) -> tuple[dict, dict]:
    if not isinstance(entries, (list, tuple)):
        raise StateError(f"projector state: groups must be a list, got {type(entries).__name__}")
    matrices, rows = {}, {}
    for position, entry in enumerate(entries):
        entry = _mapping(entry, f"groups[{position}]")
        if not {"key", "covariances", "counts"} <= set(entry) <= {"key", "covariances", "counts", "factors"}:
            raise StateError(
                f"projector state: groups[{position}] must have the fields key, covariances, counts "
                f"(and factors); got {sorted(map(str, entry))}"
            )
        key = entry["key"]
        if not isinstance(key, Hashable) or isinstance(key, torch.Tensor):
            raise StateError(f"projector state: groups[{position}].key must be a label or a name, got {key!r}")
        if key in matrices:
            raise StateError(f"projector state: group {key!r} appears twice")
        covariances = _mapping(entry["covariances"], f"group {key!r} covariances")
        counts = _mapping(entry["counts"], f"group {key!r} counts")
        factors = _mapping(entry.get("factors", {}), f"group {key!r} factors")
        for name in [*covariances, *counts, *factors]:
            if name not in shapes:
                raise StateError(f"projector state: layer {name!r} (group {key!r}): not a tracked layer of this model")
        if set(covariances) & set(factors) or set(covariances) | set(factors) != set(counts):
            raise StateError(
                f"projector state: group {key!r} has covariances for {sorted(covariances)}"
                + (f" and factors for {sorted(factors)}" if factors else "")
                + f" but counts for {sorted(counts)} (each counted layer needs exactly one of them)"
            )
        matrices[key], rows[key] = {}, {}
        for name, factor in factors.items():
            where = f"layer {name!r} factor (group {key!r})"
            _tensor(factor, where)
            count = _count(counts[name], f"layer {name!r} count (group {key!r})")
            if len(shapes[name]) != 2 or factor.dim() != 2 or factor.shape[1] != shapes[name][1] or factor.shape[0] > count:
                raise StateError(f"projector state: {where} must have shape (r, {shapes[name][-1]}) with r <= its "
                                 f"row count {count} for a layer of shape {shapes[name]}, got {tuple(factor.shape)}")
            rows[key][name] = count
            matrices[key][name] = FactoredSum(factor.to(devices[name], torch.float64, copy=True), dtype)
        for name, matrix in covariances.items():
            where = f"layer {name!r} covariance (group {key!r})"
            _tensor(matrix, where)
            if tuple(matrix.shape) != shapes[name]:
                raise StateError(f"projector state: {where} must have shape {shapes[name]}, got {tuple(matrix.shape)}")
            diagonal = matrix if matrix.dim() == 1 else matrix.diagonal(dim1=-2, dim2=-1)
            if bool((diagonal < 0).any()):
                raise StateError(f"projector state: {where} has negative diagonal entries (not a covariance)")
            rows[key][name] = _count(counts[name], f"layer {name!r} count (group {key!r})")
            matrices[key][name] = matrix.to(devices[name], dtype, copy=True)
    return matrices, rows


def _check_orthonormal(basis: torch.Tensor, where: str, padded: bool = False) -> None:
    """``U^T U = I``; with ``padded`` (a grouped slot's bases share one width, the unused
    columns of a group are zero) only the non-zero columns are checked."""
    if padded:
        basis = basis[:, basis.abs().sum(0) > 0]
    k = basis.shape[1]
    if k == 0:
        return
    gram = basis.mT @ basis
    error = float((gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max())
    tolerance = ORTHONORMALITY_TOLERANCE[basis.dtype]
    if not error <= tolerance:
        raise StateError(
            f"projector state: {where} is not orthonormal: max |U^T U - I| = {error:.3g} > {tolerance:g}"
        )


def _check_basis(basis, kind: str, shape: tuple, where: str) -> None:
    """By slot kind: ``dense`` (d, k) orthonormal, k <= d; ``grouped`` (groups, d, k) with each
    group's non-zero columns orthonormal; ``diagonal`` a bool mask (d,)."""
    if not isinstance(basis, torch.Tensor):
        raise StateError(f"projector state: {where} must be a tensor, got {type(basis).__name__}")
    if kind == "diagonal":
        if basis.dtype != torch.bool or tuple(basis.shape) != shape:
            raise StateError(
                f"projector state: {where} must be a bool mask of shape {shape}, got {basis.dtype} {tuple(basis.shape)}"
            )
        return
    _tensor(basis, where)
    if basis.dtype not in ORTHONORMALITY_TOLERANCE:
        raise StateError(f"projector state: {where} must be float32 or float64, got {basis.dtype}")
    d = shape[-1]
    leading = shape[:-2]  # (groups,) for a grouped slot, () for a dense one
    if basis.dim() != len(leading) + 2 or tuple(basis.shape[:-1]) != (*leading, d) or basis.shape[-1] > d:
        expected = ", ".join(map(str, (*leading, d, "k")))
        raise StateError(f"projector state: {where} must have shape ({expected}) with k <= {d}, got {tuple(basis.shape)}")
    if kind == "grouped":
        for index, group in enumerate(basis.unbind(0)):
            _check_orthonormal(group, f"{where} (group {index})", padded=True)
    else:
        _check_orthonormal(basis, where)


def _parse_bases(bases, slots: dict[str, tuple], devices: dict) -> dict:
    bases = _mapping(bases, "bases")
    if bases and set(bases) != set(slots):  # empty: saved before any build
        missing = sorted(set(slots) - set(bases))
        extra = sorted(set(bases) - set(slots))
        raise StateError(f"projector state: bases are missing for layers {missing}; unknown layers {extra}")
    parsed = {}
    for name, basis in bases.items():
        kind, shape = slots[name]
        _check_basis(basis, kind, shape, f"layer {name!r} basis")
        parsed[name] = basis.to(devices[name], copy=True)
    return parsed


def _parse_complements(complements, slots: dict[str, tuple], bases: dict, devices: dict) -> dict:
    """Each a dense slot's Q (d, d - k) in its basis's dtype: orthonormal and orthogonal to the
    basis (projecting with ``G Q Q^T`` is then ``G - G U U^T``)."""
    complements = _mapping(complements, "complements")
    parsed = {}
    for name, complement in complements.items():
        where = f"layer {name!r} complement"
        if name not in bases or slots[name][0] != "dense":
            raise StateError(f"projector state: {where}: only a dense layer with a basis has one")
        basis = bases[name]
        _tensor(complement, where)
        d, k = basis.shape
        if complement.dtype != basis.dtype or tuple(complement.shape) != (d, d - k):
            raise StateError(f"projector state: {where} must be {basis.dtype} of shape ({d}, {d - k}), "
                             f"got {complement.dtype} {tuple(complement.shape)}")
        complement = complement.to(devices[name], copy=True)  # where the parsed basis is
        _check_orthonormal(complement, where)
        overlap = float((basis.mT @ complement).abs().max()) if k and d - k else 0.0
        if not overlap <= ORTHONORMALITY_TOLERANCE[basis.dtype]:
            raise StateError(f"projector state: {where} is not orthogonal to the basis: max |U^T Q| = {overlap:.3g}")
        parsed[name] = complement
    return parsed


def verify_checksum(state: dict, where: str) -> None:
    """Refuse ``state`` when its content does not match its checksum; warn when it has none."""
    if CHECKSUM_FIELD not in state:
        warnings.warn(
            f"{where} carries no checksum (saved by an earlier version of unsc_fast, or unsealed after an "
            "edit): its content cannot be verified; save it again to add one",
            UserWarning, stacklevel=4,
        )
        return
    try:
        expected = state_checksum(state)
    except ChecksumError as error:
        raise StateError(f"projector state: {error}") from None
    if state[CHECKSUM_FIELD] != expected:
        raise StateError(
            f"projector state: its content does not match its checksum ({str(state[CHECKSUM_FIELD])[:19]}... "
            f"saved, {expected[:19]}... now): the state is damaged and nothing was loaded. A state edited on "
            "purpose loads once resealed with unsc_fast.projector.persistence.seal_state(state)"
        )


def _parse_row_dtypes(value, slots: dict) -> dict:
    value = _mapping(value, "row_dtypes")
    for name, dtype in value.items():
        if name not in slots or dtype not in ROW_DTYPES:
            raise StateError(f"projector state: row_dtypes[{name!r}] = {dtype!r}: need a tracked layer and one "
                             f"of {sorted(ROW_DTYPES)}")
    return {name: ROW_DTYPES[dtype] for name, dtype in value.items()}


def parse_projector_state(state, expected_format: str, slots: dict[str, tuple], devices: dict,
                          where: str = "projector state") -> ProjectorState:
    """Check ``state`` against a model whose tracked slots are ``{name: (kind, shape of the
    statistics)}`` with weights on ``devices``; return its content converted, or raise
    ``StateError`` naming the field. Its checksum is verified before any field is read."""
    if not isinstance(state, dict):
        raise StateError(f"not a NullSpaceProjector state: expected a dict, got {type(state).__name__}")
    if state.get("format") != expected_format:
        raise StateError(
            f"not a NullSpaceProjector state (expected format {expected_format!r}, got {state.get('format')!r})"
        )
    verify_checksum(state, where)
    missing = [field for field in REQUIRED_FIELDS if field not in state]
    known = REQUIRED_FIELDS + OPTIONAL_FIELDS + STATISTICS_FIELDS
    unknown = sorted(str(field) for field in state if field not in known)
    if missing or unknown:
        raise StateError(f"projector state: missing fields {missing}, unknown fields {unknown}")
    threshold = check_threshold_field(state["threshold"], "threshold")
    built_threshold = state["built_threshold"]
    if built_threshold is not None:
        built_threshold = check_threshold_field(built_threshold, "built_threshold")
    if state["dtype"] not in ACCUMULATION_DTYPES:
        raise StateError(
            f"projector state: dtype must be one of {sorted(ACCUMULATION_DTYPES)}, got {state['dtype']!r}"
        )
    dtype = ACCUMULATION_DTYPES[state["dtype"]]
    shapes = {name: shape for name, (_, shape) in slots.items()}
    _check_layer_shapes(_mapping(state["layers"], "layers"), shapes)
    matrices, rows = _parse_groups(state["groups"], shapes, dtype, devices)
    bases = _parse_bases(state["bases"], slots, devices)
    complements = _parse_complements(state.get("complements", {}), slots, bases, devices)
    built_from = state["built_from"]
    if not isinstance(built_from, (list, tuple)) or not all(isinstance(k, Hashable) for k in built_from):
        raise StateError(f"projector state: built_from must be a list of labels or names, got {built_from!r}")
    if bases and built_threshold is None:
        raise StateError("projector state: bases are present but built_threshold is None")
    row_dtypes = _parse_row_dtypes(state.get("row_dtypes", {}), slots)
    return ProjectorState(threshold, dtype, matrices, rows, bases, tuple(built_from), built_threshold, complements,
                          row_dtypes)
