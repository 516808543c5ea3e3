"""Saving and restoring a projector: tensors and plain values only (``torch.load(weights_only=True)``
reads them), sealed with a checksum of the whole content (``unsc_fast.projection.checksum``) and
checked whole before anything is installed (``unsc_fast.projector.state_validation``).

A file that cannot be read (empty, truncated, not a ``torch.save`` archive, or holding
objects other than tensors and plain values) is refused with an error naming the path and
what is wrong with it; the projector is unchanged whatever the failure.
"""
from __future__ import annotations

import os
import pickle

import torch

from unsc_fast.projection.bases import NullSpaceBases
from unsc_fast.projection.checksum import seal_state
from unsc_fast.projector import sketch_state
from unsc_fast.projector.state_validation import StateError, parse_projector_state
from unsc_fast.statistics.policies import TOTAL_KEY
from unsc_fast.statistics.store import CovarianceStore

STATE_FORMAT = "unsc_fast.NullSpaceProjector/1"

__all__ = ["STATE_FORMAT", "PersistenceMixin", "read_state_file", "seal_state"]


class PersistenceMixin:
    """``state_dict`` / ``load_state_dict`` / ``save`` / ``load`` of ``NullSpaceProjector``."""

    def state_dict(self) -> dict:
        """Everything needed to resume, as tensors and plain values (``weights_only`` loads it),
        sealed with a checksum of its content."""
        return seal_state({
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
            # build()'s definiteness check allows for rounding at the rows' precision
            "row_dtypes": {name: str(dtype).removeprefix("torch.") for name, dtype in self.store.row_dtypes.items()},
            # the statistics policy, its sketches and a total's class sketches (per-class protection)
            "statistics": self.statistics,
            "sketch_rows": dict(self._sketch_rows),
            "sketches": sketch_state.state(self._sketches),
            "class_rows": self._class_rows,
            "class_sketches": sketch_state.state(self._class_sketches),
            "forget_labels": list(self._forget_labels),
            "rounding": self.store.rounding,
        })

    def load_state_dict(self, state: dict, *, _where: str = "projector state") -> PersistenceMixin:
        """Restore a ``state_dict``; tensors follow each layer's weight device.

        All or nothing: the checksum is verified first (a mismatch is refused: the state was
        damaged, or edited without ``unsc_fast.projector.persistence.seal_state``; a state without one,
        saved by an earlier version, loads with a warning), then every field is checked
        (``unsc_fast.projector.state_validation``: layer names and shapes, tensor shapes, dtypes, finite
        values, orthonormal bases, counts, thresholds, sketches), and nothing changes unless
        every check passes.
        """
        parsed = parse_projector_state(
            state,
            STATE_FORMAT,
            slots={name: (slot.kind, tuple(slot.shape)) for name, slot in self.protection.slots.items()},
            devices=self._slot_devices,
            where=_where,
        )
        statistics = sketch_state.parse_statistics(
            state, {name: (slot.kind, tuple(slot.shape)) for name, slot in self.protection.slots.items()},
            self._slot_devices, {slot for slots in self._units.values() for slot in slots},
            _saved_policy(state, self.statistics), self._sketch_rows)
        solution = NullSpaceBases(self.protection)  # every complement computed before anything is assigned
        solution.install(parsed.bases, parsed.complements, built_from=parsed.built_from, threshold=parsed.built_threshold)
        store = CovarianceStore(parsed.dtype)
        store.replace(parsed.matrices, parsed.rows)
        store.row_dtypes.update(parsed.row_dtypes)
        store.rounding = statistics.rounding
        self.threshold, self.store = parsed.threshold, store
        self.statistics, self._class_rows = statistics.policy, statistics.class_rows
        self._set_sketch_rows(statistics.sketch_rows)
        self._sketches, self._class_sketches = statistics.sketches, statistics.class_sketches
        self._forget_labels = statistics.forget_labels
        if self.solution and solution.fingerprint() == self.solution.fingerprint():
            # The very bases in place: keep their objects, so that what is known about them
            # (the optimizer's clean momentum buffers) still holds, as it does bit for bit.
            self.solution.built_from, self.solution.threshold = solution.built_from, solution.threshold
        else:
            self.solution = solution
        return self

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> PersistenceMixin:
        """``load_state_dict`` of the state saved at ``path``; every refusal names the path."""
        state = read_state_file(path)
        try:
            return self.load_state_dict(state, _where=f"projector state file {os.fspath(path)!r}")
        except StateError as error:
            raise StateError(f"{os.fspath(path)!r}: {error}") from None


def _saved_policy(state, current: str) -> str:
    """The policy of a state saved before it was recorded: one total if it holds one."""
    groups = state.get("groups") if isinstance(state, dict) else None
    if isinstance(groups, list) and any(isinstance(e, dict) and e.get("key") == TOTAL_KEY for e in groups):
        return "total"
    return current


def read_state_file(path):
    """``torch.load(path, weights_only=True)`` on the CPU, with a ``StateError`` that names the
    path and says what is wrong where the file is not a readable saved state."""
    where = repr(os.fspath(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, MemoryError):
        raise
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise StateError(
                f"{where}: the file holds Python objects other than tensors and plain values, which load() "
                "never unpickles (weights_only=True): it is not a saved projector state"
            ) from None
        raise StateError(f"{where}: {_damaged(path, error)}") from None
    except Exception as error:  # noqa: BLE001 - EOFError, RuntimeError (zip), OSError, ...: all mean the same
        raise StateError(f"{where}: {_damaged(path, error)}") from None


def _damaged(path, error: Exception) -> str:
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size is None:
        return f"not a readable file ({type(error).__name__}: {error})"
    if size == 0:
        return "the file is empty (0 bytes): not a saved projector state (was the save interrupted?)"
    detail = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return (
        f"not a readable torch.save file ({size} bytes; {type(error).__name__}: {detail}): the file is truncated "
        "or damaged, or was never a saved projector state"
    )
