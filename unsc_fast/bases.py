"""Which factor of a layer's projection to keep: the basis U or its orthogonal complement.

``G - G U U^T`` costs ``O(out * d * k)``; with the complement Q of U the same projection is
``G Q Q^T``, ``O(out * d * (d - k))``. The rule lives here once: keep Q when it is the
smaller one (``2k > d``). Every place that builds or loads bases calls ``complement_if_cheaper``.
"""
from __future__ import annotations

import torch

from unsc_fast import ops


def prefers_complement(kept: int, dim: int) -> bool:
    """True when the null space (d - k columns) is smaller than the kept basis (k columns)."""
    return 2 * kept > dim


def complement_if_cheaper(basis: torch.Tensor) -> torch.Tensor | None:
    """The orthonormal complement of ``basis`` (d, k) when projecting with it is cheaper, else None."""
    dim, kept = basis.shape
    return ops.complement_basis(basis).contiguous() if prefers_complement(kept, dim) else None
