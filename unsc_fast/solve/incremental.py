"""The remaining subspace built class by class, as the official UNSC code builds it.

The official code (its notebooks, ``utils.update_GPM``) does not take one energy basis of the
summed remaining covariance. It walks the remaining classes in label order, GPM-style
(Saha et al., "Gradient Projection Memory", ICLR 2021): for class ``c`` with representation
matrix ``R_c`` (a layer's inputs as columns) and the current basis ``U``, it projects ``U``
out of ``R_c``, takes the SVD of the residual ``R_hat = (I - U U^T) R_c``, and appends its
top left singular vectors until the energy of ``R_c`` captured inside the grown basis reaches
the class's threshold of ``||R_c||_F^2``. The threshold rises with the class label:
``0.97 + 0.003 * c`` (0.97 ... 0.997 for ten classes), so later classes add fewer
directions and the basis of a class learned early is never revised.

Here the same criterion runs on the per-label covariances the store already holds, with no
second pass over the data. With ``C_c = R_c R_c^T``:

* ``||R_c||_F^2 = trace(C_c)`` (the class's total energy);
* ``(I - U U^T) R_c`` has left singular vectors equal to the eigenvectors of
  ``P C_c P`` (``P = I - U U^T``) and squared singular values equal to its eigenvalues;
* the energy already inside ``U`` is ``trace(U^T C_c U) = trace(C_c) - trace(P C_c P)``.

So "add the top eigenvectors of ``P C_c P`` until ``trace(U^T C_c U) + sum of their
eigenvalues >= t_c * trace(C_c)``" keeps exactly the directions GPM's SVD criterion keeps
(up to the order of equal eigenvalues), from ``d x d`` matrices instead of ``d x n`` ones.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Mapping

import torch

OFFICIAL_START, OFFICIAL_STEP, OFFICIAL_CAP = 0.97, 0.003, 0.997


def official_threshold(key: Hashable, position: int) -> float:
    """The official rising threshold: ``0.97 + 0.003 * c`` for integer label ``c`` (the
    official loop indexes by the label itself), else by ``position``; capped at 0.997 so
    that more than ten classes never ask for all the energy (the official runs stop at 9)."""
    index = int(key) if isinstance(key, int) and key >= 0 else position
    return min(OFFICIAL_START + OFFICIAL_STEP * index, OFFICIAL_CAP)


def class_thresholds(keys: list, thresholds=None) -> list[float]:
    """One threshold per key: ``None`` the official rule, a float for all, a mapping by key
    or a callable ``(key, position) -> float``."""
    if thresholds is None:
        thresholds = official_threshold
    if isinstance(thresholds, (int, float)):
        values = [float(thresholds)] * len(keys)
    elif isinstance(thresholds, Mapping):
        missing = [k for k in keys if k not in thresholds]
        if missing:
            raise KeyError(f"class_thresholds has no entry for {missing}")
        values = [float(thresholds[k]) for k in keys]
    elif callable(thresholds):
        values = [float(thresholds(k, i)) for i, k in enumerate(keys)]
    else:
        raise TypeError("class_thresholds: None, a float, a mapping key -> float or a callable (key, position)")
    for value in values:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a class threshold must be in (0, 1], got {value}")
    return values


def incremental_basis(covariances: Iterable[torch.Tensor], thresholds: Iterable[float]) -> torch.Tensor:
    """Grow an orthonormal ``(d, k)`` basis class by class (see the module docstring).

    A class whose energy inside the current basis already reaches its threshold adds nothing.
    Eigen-decompositions run in float64 (the residual's small eigenvalues decide the cut);
    the basis is returned in float64.
    """
    basis = None
    for covariance, threshold in zip(covariances, thresholds):
        c = covariance.detach().to(torch.float64)
        c = (c + c.T) / 2
        d = c.shape[0]
        if basis is None:
            basis = c.new_zeros((d, 0))
        total = torch.trace(c)
        if total <= 0 or basis.shape[1] >= d:
            continue
        inside = torch.trace(basis.T @ c @ basis) if basis.shape[1] else total.new_zeros(())
        need = threshold * total - inside
        if need <= 0:
            continue
        projected = c - basis @ (basis.T @ c)
        projected = projected - (projected @ basis) @ basis.T
        values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        reached = torch.cumsum(values, 0) >= need * (1 - 1e-12)
        k = int(reached.nonzero()[0]) + 1 if reached.any() else int((values > 0).sum())
        k = min(k, d - basis.shape[1])
        if k == 0:
            continue
        new = vectors[:, :k]
        new = new - basis @ (basis.T @ new)  # re-orthogonalise against rounding
        new, _ = torch.linalg.qr(new)
        basis = torch.cat([basis, new], 1)
    if basis is None:
        raise ValueError("incremental_basis needs at least one covariance")
    return basis


def incremental_bases(store, slots: dict, keys: list, thresholds: list[float]) -> dict[str, torch.Tensor]:
    """Per slot (``slots``: name -> ``Slot``), the class-by-class basis over ``keys`` (in that
    order) from the per-key covariances of ``store``.

    Dense slots grow one basis; grouped slots grow one per group (zero-padded as
    ``Slot.solve`` pads them); diagonal slots (embeddings) keep every row seen, as
    ``Slot.solve`` does, since the threshold does not apply there.
    """
    bases = {}
    for slot in slots.values():
        parts = [store.matrix(k, slot.name) for k in keys]
        pairs = [(p, t) for p, t in zip(parts, thresholds) if p is not None]
        if not pairs:
            raise RuntimeError(f"layer {slot.name!r} saw no input under keys {keys}")
        if slot.kind == "diagonal":
            basis = slot.solve(store.kept_sum(slot.name, keys), 1.0)
        elif slot.kind == "grouped":
            per_group = [
                incremental_basis([p[g] for p, _ in pairs], [t for _, t in pairs]) for g in range(slot.groups)
            ]
            width = max(b.shape[1] for b in per_group)
            basis = pairs[0][0].new_zeros((slot.groups, slot.dim, width))
            for g, b in enumerate(per_group):
                basis[g, :, : b.shape[1]] = b.to(basis.dtype)
        else:
            basis = incremental_basis([p for p, _ in pairs], [t for _, t in pairs]).to(pairs[0][0].dtype)
        bases[slot.name] = basis
    return bases

