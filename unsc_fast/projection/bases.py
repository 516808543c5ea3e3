"""The bases a build produced, per slot, with the factor each projection uses: the basis U
or its orthogonal complement Q, whichever is smaller (the rule: ``solve.complement``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unsc_fast.projection.apply import apply_uses_, protects_nothing, residual
from unsc_fast.projection.checksum import state_checksum
from unsc_fast.solve.complement import complement_if_cheaper

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.tracking.layers import Protection


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
