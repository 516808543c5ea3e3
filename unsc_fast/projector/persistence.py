"""Saving and restoring a projector: tensors and plain values only (``torch.load(weights_only=True)``
reads them), checked whole before anything is installed (``unsc_fast.projector.state_validation``)."""
from __future__ import annotations

import torch

from unsc_fast.projection.bases import NullSpaceBases
from unsc_fast.projector.state_validation import parse_projector_state
from unsc_fast.statistics.store import CovarianceStore

STATE_FORMAT = "unsc_fast.NullSpaceProjector/1"


class PersistenceMixin:
    """``state_dict`` / ``load_state_dict`` / ``save`` / ``load`` of ``NullSpaceProjector``."""

    def state_dict(self) -> dict:
        """Everything needed to resume, as tensors and plain values (``weights_only`` loads it)."""
        return {
            "format": STATE_FORMAT,
            "threshold": self.threshold,
            "dtype": str(self.dtype).removeprefix("torch."),
            "layers": {name: list(slot.shape) for name, slot in self.protection.slots.items()},
            "groups": self.store.state_dict(),
            "bases": dict(self._bases),
            "built_from": list(self.built_from),
            "built_threshold": self.built_threshold,
            # The complements the projection uses: eigh's, which a QR of the basis would not
            # reproduce bitwise, and resuming must project exactly as before.
            "complements": dict(self._complements),
        }

    def load_state_dict(self, state: dict) -> PersistenceMixin:
        """Restore a ``state_dict``; tensors follow each layer's weight device.

        All or nothing: the whole state is checked first (``unsc_fast.projector.state_validation``:
        layer names and shapes, tensor shapes, dtypes, finite values, orthonormal bases,
        counts, thresholds) and nothing changes unless every check passes.
        """
        parsed = parse_projector_state(
            state,
            STATE_FORMAT,
            slots={name: (slot.kind, tuple(slot.shape)) for name, slot in self.protection.slots.items()},
            devices=self._slot_devices,
        )
        solution = NullSpaceBases(self.protection)  # every complement computed before anything is assigned
        solution.install(parsed.bases, parsed.complements, built_from=parsed.built_from, threshold=parsed.built_threshold)
        store = CovarianceStore(parsed.dtype)
        store.replace(parsed.matrices, parsed.rows)
        self.threshold, self.store = parsed.threshold, store
        self.solution = solution
        return self

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> PersistenceMixin:
        return self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
