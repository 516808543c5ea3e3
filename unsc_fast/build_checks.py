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


def subtracted_diagonal(store: CovarianceStore, name: str, subtract: Iterable, dim: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """The diagonal (float64, length ``dim``) of this process's ``subtract`` sums for layer
    ``name``: zeros where none was observed (distributed ranks sum theirs)."""
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    for key in subtract:
        part = store.matrix(key, name)
        if part is not None:
            total += part.diagonal().to(device=total.device, dtype=torch.float64)
    return total


def check_subtraction(store: CovarianceStore, name: str, covariance: torch.Tensor, subtract: Iterable) -> None:
    """Refuse ``covariance`` (kept sum less the ``subtract`` groups) when it is clearly
    indefinite, i.e. the subtracted samples were not part of the kept ones."""
    subtract = list(subtract)
    if not any(store.matrix(key, name) is not None for key in subtract):
        return
    removed = subtracted_diagonal(store, name, subtract, covariance.shape[0], covariance.device)
    check_definite(name, covariance, removed, subtract)


def check_definite(name: str, covariance: torch.Tensor, removed: torch.Tensor, subtract: Iterable) -> None:
    """``covariance`` is a kept sum less groups whose diagonals add up to ``removed``: raise
    when it is clearly indefinite (a diagonal entry, or below ``MAX_DEFINITENESS_CHECK_DIM``
    the smallest eigenvalue, more negative than rounding of the sum before subtraction allows)."""
    after = covariance.diagonal().to(torch.float64)
    before = after + removed.to(after.device)
    tolerance = SUBTRACTION_ULPS * torch.finfo(covariance.dtype).eps
    trace_before = float(before.sum())
    problems = []
    if bool((after < -tolerance * before).any()):
        problems.append(f"negative diagonal mass {float(after.clamp(max=0).sum()):.4g}")
    d = covariance.shape[0]
    if not problems and 0 < d <= MAX_DEFINITENESS_CHECK_DIM and trace_before > 0:
        shifted = covariance.to(torch.float64) + tolerance * trace_before * torch.eye(
            d, dtype=torch.float64, device=covariance.device
        )
        if int(torch.linalg.cholesky_ex(shifted).info) != 0:
            smallest = float(torch.linalg.eigvalsh(covariance.to(torch.float64))[0])
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


def warn_if_everything_blocked(bases: dict[str, torch.Tensor], stacklevel: int = 3) -> None:
    """Warn when every tracked layer's basis spans its whole input space: every update is
    then projected to zero, and fine-tuning under the projector cannot change the model."""
    if bases and all(basis.shape[1] == basis.shape[0] > 0 for basis in bases.values()):
        warnings.warn(
            f"build(): every tracked layer's basis spans its whole input space ({len(bases)} layers, "
            "k = d), so every update to them is projected to zero and unlearning cannot change "
            "these weights: lower the threshold, or observe less data (a sample-wise request "
            "whose remaining data spans everything leaves no null space)",
            UserWarning,
            stacklevel=stacklevel,
        )
