"""Checks that a build request can do what it says, before its bases are trusted (RELIABILITY 66).

Two requests used to build "successfully" and protect nothing:

- Only empty batches observed (0 rows): every covariance is zero, the bases have rank 0,
  ``built`` is True and the optimizer takes unprojected steps.
- ``subtract=`` a group whose samples are not inside the kept groups: ``kept - subtracted``
  is then indefinite, and an energy threshold over negative eigenvalues means nothing.

``check_rows`` runs once before the solves; ``check_subtraction`` on each layer's kept sum,
allowing for the rounding of the rows and sums (``rounding_allowance``, documented there);
``warn_if_everything_blocked`` on the new bases (the opposite no-op: nothing can move).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, NamedTuple

import torch

from unsc_fast.statistics.store import CovarianceStore, coordinate_energies, listed

# The rounding ``kept - subtracted`` may show when the subtracted samples *are* inside the
# kept ones (``rounding_allowance``): two forwards of one sample (another batch, another GEMM
# path) give rows that differ by up to ROW_ULPS epsilons of the rows' dtype, relative to the
# row's norm (measured: <= 9 on All-CNN and ResNet-18 in float32, batch of 16 vs 1); a sum of
# n rows rounds by about ACCUMULATION_ULPS * sqrt(n) epsilons of the accumulation dtype,
# relative to its trace.
ROW_ULPS = 256
ACCUMULATION_ULPS = 8
# Rows whose dtype was not recorded (states saved before it was) are taken as float32.
DEFAULT_ROW_DTYPE = torch.float32
# Above this width the definiteness test (a Cholesky factorisation, d^3/3) is skipped and
# only the diagonal is checked: the wide layers are those built with a sketch to avoid d^3.
MAX_DEFINITENESS_CHECK_DIM = 4096


class Removal(NamedTuple):
    """What a build subtracts from one slot's kept sum, as the definiteness check needs it:
    the diagonal of the subtracted sums, the rows summed on both sides, and the epsilon of
    the coarsest dtype those rows arrived in."""

    diagonal: torch.Tensor
    rows: int
    row_eps: float


def rounding_allowance(removed_trace, trace_before, rows: int, row_eps: float, dtype: torch.dtype, dim: int,
                       accumulation_eps: float | None = None):
    """How far below zero an eigenvalue of ``kept - subtracted`` may fall from rounding alone.

    With ``rho = ROW_ULPS * row_eps`` (``row_eps``: the rows' epsilon, at least the
    accumulation dtype's), a subtracted row ``b`` recomputed from a kept row ``a`` has
    ``||a a^T - b b^T|| <= (2 rho + rho^2) ||b||^2``, summed: ``(2 rho + rho^2) * removed_trace``.
    Accumulating ``rows`` rows in ``dtype`` perturbs the sums by about
    ``ACCUMULATION_ULPS * sqrt(rows) * eps(dtype) * trace_before``, and the float64 check
    itself by ``dim * eps(float64) * trace_before``. Per group for grouped slots (the traces
    may be tensors). ``accumulation_eps``: the sums' own unit roundoff where coarser than
    ``dtype``'s (float32 sums folded into a float64 total)."""
    eps = max(torch.finfo(dtype).eps, accumulation_eps or 0.0)
    rho = ROW_ULPS * max(row_eps, eps)
    accumulation = ACCUMULATION_ULPS * math.sqrt(max(rows, 1)) * eps
    check = dim * torch.finfo(torch.float64).eps
    return (2 * rho + rho * rho) * removed_trace + (accumulation + check) * trace_before


def check_rows(store: CovarianceStore, names: Iterable[str], kept: list, subtract: Iterable = ()) -> None:
    """Refuse a build in which a layer that was observed has no input row left."""
    subtract = list(subtract)
    empty = [
        name for name in names
        if any(store.has(key, name) for key in kept)
        and store.kept_rows(name, kept, subtract) <= 0
    ]
    if empty:
        raise RuntimeError(
            f"build(): layers {empty} have 0 input rows in groups {listed(kept)}"
            + (f" less {listed(subtract)}" if subtract else "")
            + " (only empty batches were observed, or subtract removed every row): their bases "
            "would be empty and every update to them unprojected; observe non-empty batches"
        )


def row_eps(store: CovarianceStore, name: str) -> float:
    """The epsilon of the coarsest dtype layer ``name``'s rows arrived in (float32 if unknown)."""
    return torch.finfo(store.row_dtypes.get(name, DEFAULT_ROW_DTYPE)).eps


def removal(store: CovarianceStore, name: str, kept: Iterable, subtract: Iterable, shape,
            device: torch.device | None = None) -> Removal:
    """This process's ``Removal`` for the slot ``name`` whose statistics have ``shape``: the
    diagonal (float64) of the ``subtract`` sums, zeros where none was observed (distributed
    ranks sum theirs), and the rows of ``kept`` and ``subtract``."""
    shape, subtract = tuple(shape), list(subtract)
    total = torch.zeros(shape if len(shape) == 1 else shape[:-1], dtype=torch.float64, device=device)
    for key in subtract:
        part = store.diagonal(key, name)
        if part is not None:
            total += part.to(device=total.device, dtype=torch.float64)
    rows = sum(store.rows(key, name) for key in [*kept, *subtract])
    return Removal(total, rows, row_eps(store, name))


def check_subtraction(store: CovarianceStore, name: str, covariance: torch.Tensor, kept: Iterable,
                      subtract: Iterable) -> None:
    """Refuse ``covariance`` (kept sum less the ``subtract`` groups) when it is clearly
    indefinite, i.e. the subtracted samples were not part of the kept ones."""
    subtract = list(subtract)
    if not any(store.has(key, name) for key in subtract):
        return
    check_definite(name, covariance, removal(store, name, kept, subtract, covariance.shape, covariance.device),
                   subtract, store.rounding)


def check_definite(name: str, covariance: torch.Tensor, removed: Removal, subtract: Iterable,
                   rounding: float | None = None) -> None:
    """``covariance`` is a kept sum less groups described by ``removed``: raise when it is
    indefinite beyond ``rounding_allowance`` (a diagonal entry, or below
    ``MAX_DEFINITENESS_CHECK_DIM`` the smallest eigenvalue, per group). ``rounding``: the unit
    roundoff the sums were accumulated with where coarser than their dtype's (a float64 total
    folded from float32 per-label sums carries float32's; ``CovarianceStore.rounding``)."""
    after = coordinate_energies(covariance).to(torch.float64)
    before = after + removed.diagonal.to(after.device)
    trace_before = float(before.sum())
    d = covariance.shape[-1]
    allowance = rounding_allowance(removed.diagonal.to(after.device).sum(-1), before.sum(-1), removed.rows,
                                   removed.row_eps, covariance.dtype, d, rounding)
    problems = []
    if bool((after < -allowance[..., None]).any()):
        problems.append(f"negative diagonal mass {float(after.clamp(max=0).sum()):.4g}")
    if not problems and covariance.dim() >= 2 and 0 < d <= MAX_DEFINITENESS_CHECK_DIM and trace_before > 0:
        matrices = covariance.to(torch.float64)
        shift = allowance.clamp(min=torch.finfo(torch.float64).tiny)  # a group with no data is exactly 0
        shifted = matrices + shift[..., None, None] * torch.eye(d, dtype=torch.float64, device=matrices.device)
        if bool((torch.linalg.cholesky_ex(shifted).info != 0).any()):
            smallest = float(torch.linalg.eigvalsh(matrices)[..., 0].min())
            problems.append(f"min eigenvalue {smallest:.4g}")
    if problems:
        raise ValueError(
            f"build(subtract={listed(subtract)}): layer {name!r}: the kept covariance less the "
            f"subtracted groups is indefinite ({', '.join(problems)}; trace before subtraction "
            f"{trace_before:.4g}; rounding of {removed.rows} rows allows {float(allowance.max()):.3g}): "
            "the subtracted samples are not inside the kept groups. Subtract only a group whose "
            "samples were also observed under the kept keys"
        )


def warn_if_everything_blocked(slots: dict, bases: dict[str, torch.Tensor], stacklevel: int = 3) -> None:
    """Warn when every tracked slot's basis spans its whole input space (``slot.rank`` equals
    the width for every group): every update is then projected to zero, and fine-tuning under
    the projector cannot change the model."""
    def full(name: str, basis: torch.Tensor) -> bool:
        slot = slots[name]
        ranks = slot.rank(basis)
        return slot.dim > 0 and all(r == slot.dim for r in (ranks if isinstance(ranks, list) else [ranks]))

    if bases and all(full(name, basis) for name, basis in bases.items()):
        warnings.warn(
            f"build(): every tracked layer's basis spans its whole input space ({len(bases)} layers, "
            "k = d), so every update to them is projected to zero and unlearning cannot change "
            "these weights: lower the threshold, or observe less data (a sample-wise request "
            "whose remaining data spans everything leaves no null space)",
            UserWarning,
            stacklevel=stacklevel,
        )
