"""The bases a build produced, and which factor of each projection to keep: the basis U or
its orthogonal complement.

``G - G U U^T`` costs ``O(out * d * k)``; with the complement Q of U the same projection is
``G Q Q^T``, ``O(out * d * (d - k))``. The rule lives here once: keep Q when it is the
smaller one (``2k > d``). Every place that builds or loads bases calls ``complement_if_cheaper``,
which takes the solver's own complement where eigh ran (its other eigenvectors) and runs a QR
only for a sketched or loaded basis.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unsc_fast import ops
from unsc_fast.projection import apply_uses_, protects_nothing, residual
from unsc_fast.state_checksum import state_checksum

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.layers import Protection


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


class NullSpaceBases:
    """The bases of the last build, per slot, their cheaper complements, and what they were
    built from: the one owner of the projection's state, as the store owns the statistics.

    Installing is all or nothing (every complement is computed before anything is assigned),
    so a failed build or load leaves the previous bases in place.
    """

    def __init__(self, protection: "Protection") -> None:
        self.protection = protection
        self.bases: dict[str, torch.Tensor] = {}
        self.complements: dict[str, torch.Tensor] = {}
        self.built_from: tuple = ()
        self.threshold: float | None = None
        self._fingerprint: str | None = None

    def __bool__(self) -> bool:
        return bool(self.bases)

    def install(self, bases: dict, complements: dict | None = None, *, built_from=(), threshold=None) -> None:
        """``complements``: what the solver already has per slot (or None); each dense slot
        keeps its complement by ``complement_if_cheaper``, computed where it is missing."""
        given = complements or {}
        complements = {
            name: complement_if_cheaper(basis, given.get(name)) if self.protection.slots[name].kind == "dense" else None
            for name, basis in bases.items()
        }
        self.bases = bases
        self.complements = {name: q for name, q in complements.items() if q is not None}
        self.built_from, self.threshold = tuple(built_from), threshold
        self._fingerprint = None

    def fingerprint(self) -> str:
        """A checksum of the bases and complements (what the projection depends on), computed
        once per build: equal fingerprints project bit for bit alike, also across a save and
        load (the optimizer's saved knowledge of clean momentum buffers is tied to it)."""
        if self._fingerprint is None:
            self._fingerprint = state_checksum({"bases": self.bases, "complements": self.complements})
        return self._fingerprint

    def ranks(self) -> dict[str, int | list[int]]:
        """Kept dimensions per slot (one per group for grouped slots)."""
        return {name: self.protection.slots[name].rank(basis) for name, basis in self.bases.items()}

    def require_built(self) -> None:
        if not self.bases:
            raise RuntimeError("the projector has no bases yet: observe() data, then call build()")
        for name, slot in self.protection.slots.items():
            width = self.bases[name].shape[0 if slot.kind != "grouped" else 1]
            if width != slot.dim:
                raise RuntimeError(
                    f"layer {name!r} now takes inputs of width {slot.dim} but its basis was built "
                    f"for {width}: rebuild the projector"
                )

    def protects(self, uses: list) -> bool:
        """Whether anything of the remaining data is kept for these uses (before a build: yes)."""
        return not self.bases or not protects_nothing(uses, self.protection, self.bases)

    def apply_(self, tensor: torch.Tensor, uses: list) -> torch.Tensor:
        """Project ``tensor`` onto the null space of every use, in place."""
        return apply_uses_(tensor, uses, self.protection, self.bases, self.complements, _on_device)

    def residual(self, change: torch.Tensor, uses: list) -> float:
        return residual(change, uses, self.protection, self.bases)


def _on_device(table: dict, name: str, device: torch.device) -> torch.Tensor:
    """A basis on ``device``, moved once and cached there."""
    if table[name].device != device:
        table[name] = table[name].to(device)
    return table[name]
