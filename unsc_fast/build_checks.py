"""Checks that a build request can do what it says, before its bases are trusted (RELIABILITY 66).

Two requests used to build "successfully" and protect nothing:

- Only empty batches observed (0 rows): every covariance is zero, the bases have rank 0,
  ``built`` is True and the optimizer takes unprojected steps.
- ``subtract=`` a group whose samples are not inside the kept groups: ``kept - subtracted``
  is then indefinite, and an energy threshold over negative eigenvalues means nothing.

``check_rows`` runs once before the solves; ``check_subtraction`` on each layer's kept sum;
``warn_if_everything_blocked`` on the new bases (the opposite no-op: nothing can move).
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch

from unsc_fast.store import CovarianceStore, listed

# Cancellation in ``kept - subtracted`` is relative to the kept sum before subtraction; a
# deficit larger than this many ulps of it is a real one, not rounding.
SUBTRACTION_ULPS = 1e4
# Above this width the definiteness test (a Cholesky factorisation, d^3/3) is skipped and
# only the diagonal is checked: the wide layers are those built with a sketch to avoid d^3.
MAX_DEFINITENESS_CHECK_DIM = 4096


def check_rows(store: CovarianceStore, names: Iterable[str], kept: list, subtract: Iterable = ()) -> None:
    """Refuse a build in which a layer that was observed has no input row left."""
    subtract = list(subtract)
    empty = [
        name for name in names
        if any(store.matrix(key, name) is not None for key in kept)
        and store.kept_rows(name, kept, subtract) <= 0
    ]
    if empty:
        raise RuntimeError(
            f"build(): layers {empty} have 0 input rows in groups {listed(kept)}"
            + (f" less {listed(subtract)}" if subtract else "")
            + " (only empty batches were observed, or subtract removed every row): their bases "
            "would be empty and every update to them unprojected; observe non-empty batches"
        )


def _diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The per-coordinate energies of a slot's statistics: the diagonal of a (d, d) or
    (groups, d, d) covariance, or a diagonal slot's (d,) counts themselves."""
    return matrix if matrix.dim() == 1 else matrix.diagonal(dim1=-2, dim2=-1)


def subtracted_diagonal(store: CovarianceStore, name: str, subtract: Iterable, shape,
                        device: torch.device | None = None) -> torch.Tensor:
    """The diagonal (float64) of this process's ``subtract`` sums for the slot ``name`` whose
    statistics have ``shape``: zeros where none was observed (distributed ranks sum theirs)."""
    shape = tuple(shape)
    total = torch.zeros(shape if len(shape) == 1 else shape[:-1], dtype=torch.float64, device=device)
    for key in subtract:
        part = store.matrix(key, name)
        if part is not None:
            total += _diagonal(part).to(device=total.device, dtype=torch.float64)
    return total


def check_subtraction(store: CovarianceStore, name: str, covariance: torch.Tensor, subtract: Iterable) -> None:
    """Refuse ``covariance`` (kept sum less the ``subtract`` groups) when it is clearly
    indefinite, i.e. the subtracted samples were not part of the kept ones."""
    subtract = list(subtract)
    if not any(store.matrix(key, name) is not None for key in subtract):
        return
    removed = subtracted_diagonal(store, name, subtract, covariance.shape, covariance.device)
    check_definite(name, covariance, removed, subtract, store.rounding)


def check_definite(name: str, covariance: torch.Tensor, removed: torch.Tensor, subtract: Iterable,
                   rounding: float | None = None) -> None:
    """``covariance`` is a kept sum less groups whose diagonals add up to ``removed``: raise
    when it is clearly indefinite (a diagonal entry, or below ``MAX_DEFINITENESS_CHECK_DIM``
    the smallest eigenvalue, more negative than rounding of the sum before subtraction allows).
    ``rounding``: the unit roundoff the sums were accumulated with (default: their dtype's;
    a float64 total folded from float32 per-label sums carries float32's)."""
    after = _diagonal(covariance).to(torch.float64)
    before = after + removed.to(after.device)
    tolerance = SUBTRACTION_ULPS * (rounding or torch.finfo(covariance.dtype).eps)
    trace_before = float(before.sum())
    problems = []
    if bool((after < -tolerance * before).any()):
        problems.append(f"negative diagonal mass {float(after.clamp(max=0).sum()):.4g}")
    d = covariance.shape[-1]
    if not problems and covariance.dim() >= 2 and 0 < d <= MAX_DEFINITENESS_CHECK_DIM and trace_before > 0:
        matrices = covariance.to(torch.float64)
        shift = (tolerance * before.sum(-1)).clamp(min=tolerance * trace_before / max(1, before.numel() // d))
        shifted = matrices + shift[..., None, None] * torch.eye(d, dtype=torch.float64, device=matrices.device)
        if bool((torch.linalg.cholesky_ex(shifted).info != 0).any()):
            smallest = float(torch.linalg.eigvalsh(matrices)[..., 0].min())
            problems.append(f"min eigenvalue {smallest:.4g}")
    if problems:
        rounding = (
            " (or, if they are, the float32 sums cancelled: observe with dtype=torch.float64)"
            if covariance.dtype == torch.float32 else ""
        )
        raise ValueError(
            f"build(subtract={listed(subtract)}): layer {name!r}: the kept covariance less the "
            f"subtracted groups is indefinite ({', '.join(problems)}; trace before subtraction "
            f"{trace_before:.4g}): the subtracted samples are not inside the kept groups{rounding}. Subtract "
            "only a group whose samples were also observed under the kept keys"
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
