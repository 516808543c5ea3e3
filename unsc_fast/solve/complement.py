"""Which factor of each projection to keep: the basis U or its orthogonal complement.

``G - G U U^T`` costs ``O(out * d * k)``; with the complement Q of U the same projection is
``G Q Q^T``, ``O(out * d * (d - k))``. The rule lives here once: keep Q when it is the
smaller one (``2k > d``). Every place that builds or loads bases calls ``complement_if_cheaper``,
which takes the solver's own complement where eigh ran (its other eigenvectors) and runs a QR
only for a sketched or loaded basis.
"""
from __future__ import annotations

import torch

from unsc_fast import ops


def prefers_complement(kept: int, dim: int) -> bool:
    """True when the null space (d - k columns) is smaller than the kept basis (k columns)."""
    return 2 * kept > dim


def complement_if_cheaper(basis: torch.Tensor, solved: torch.Tensor | None = None) -> torch.Tensor | None:
    """The orthonormal complement of ``basis`` (d, k) when projecting with it is cheaper, else None.

    ``solved``: the complement the solver already has (eigh's other eigenvectors), used as is;
    without it (a sketched basis, a loaded state) a QR builds one."""
    dim, kept = basis.shape
    if not prefers_complement(kept, dim):
        return None
    return solved if solved is not None else ops.complement_basis(basis).contiguous()
