"""Saving and restoring a projector: tensors and plain values only (``torch.load(weights_only=True)``
reads them), checked whole before anything is installed (``unsc_fast.state_validation``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unsc_fast import sketch_state
from unsc_fast.bases import NullSpaceBases
from unsc_fast.statistics import TOTAL_KEY
from unsc_fast.state_validation import parse_projector_state
from unsc_fast.store import CovarianceStore

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.projector import NullSpaceProjector

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
            "statistics": self.statistics,
            "sketch_rows": dict(self._sketch_rows),
            "sketches": sketch_state.state(self._sketches),
            "class_rows": self._class_rows,
            "class_sketches": sketch_state.state(self._class_sketches),
            "forget_labels": list(self._forget_labels),
            "rounding": self.store.rounding,
        }

    def load_state_dict(self, state: dict) -> "NullSpaceProjector":
        """Restore a ``state_dict``; tensors follow each layer's weight device.

        All or nothing: the whole state is checked first (``unsc_fast.state_validation``:
        layer names and shapes, tensor shapes, dtypes, finite values, orthonormal bases,
        counts, thresholds) and nothing changes unless every check passes.
        """
        parsed = parse_projector_state(
            state,
            STATE_FORMAT,
            slots={name: (slot.kind, tuple(slot.shape)) for name, slot in self.protection.slots.items()},
            devices=self._slot_devices,
            sketchable={slot for slots in self._units.values() for slot in slots},
            default_policy=_saved_policy(state, self.statistics),
        )
        solution = NullSpaceBases(self.protection)  # every complement computed before anything is assigned
        solution.install(parsed.bases, parsed.complements, built_from=parsed.built_from, threshold=parsed.built_threshold)
        store = CovarianceStore(parsed.dtype)
        store.replace(parsed.matrices, parsed.rows)
        statistics = parsed.statistics
        store.rounding = statistics.rounding
        self.threshold, self.store = parsed.threshold, store
        self.solution = solution
        self.statistics, self._class_rows = statistics.policy, statistics.class_rows
        self._set_sketch_rows(statistics.sketch_rows)
        self._sketches, self._class_sketches = statistics.sketches, statistics.class_sketches
        self._forget_labels = statistics.forget_labels
        return self

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> "NullSpaceProjector":
        return self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _saved_policy(state, current: str) -> str:
    """The policy of a state saved before it was recorded: one total if it holds one."""
    groups = state.get("groups") if isinstance(state, dict) else None
    if isinstance(groups, list) and any(isinstance(e, dict) and e.get("key") == TOTAL_KEY for e in groups):
        return "total"
    return current
