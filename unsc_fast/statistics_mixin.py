"""The projector's side of the statistics policies (``unsc_fast.statistics``): memory
estimates, forget passes, and the hooks of sketched layers."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from unsc_fast import sketch
from unsc_fast import statistics as policies

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.observation import Observation


class StatisticsMixin:
    """Part of ``NullSpaceProjector``: what its statistics cost and which keys they hold."""

    def memory_estimate(self, labels: int = 1, *, dtype: torch.dtype | None = None) -> "policies.MemoryEstimate":
        """Bytes the statistics of this model would take for ``labels`` labels, per policy and
        per layer, before observing anything (``print()`` it for a table)."""
        return policies.estimate(self._slot_sizes(), labels, dtype or self._requested_dtype)

    def reset_forget(self) -> None:
        """Drop the forget passes observed so far (a new request starts from none)."""
        for key in self.forget_keys:
            self.store.reset([key])
            self._sketches.pop(key, None)

    @property
    def forget_keys(self) -> list:
        """Keys of the forget passes observed and not reset (subtracted by ``build``)."""
        return [k for k in self._keys() if policies.is_forget_key(k)]

    def _keys(self) -> list:
        """Keys observed in the dense store or the sketches, in first-seen order."""
        return list(dict.fromkeys([*self.store.keys, *self._sketches]))

    def _sketch_observation(self, observation: Observation, router) -> "sketch.SketchObservation | None":
        """Hooks for the sketched layers, filing rows under the same keys as the dense ones."""
        if not self.sketch_rows:
            return None
        groups = [(router.key(key), index) for key, index in observation.groups]
        targets = [sketch.SketchTarget(slot, self.layers[name].module, self.sketch_rows[name])
                   for slot, name in self._sketch_slots.items()]
        return sketch.SketchObservation(self._sketches, targets, groups, torch.float64, observation.batch_size)

    def _slot_sizes(self) -> dict[str, int]:
        """Numbers each slot's statistics hold (d^2 for a dense slot)."""
        return {slot.name: math.prod(slot.shape) for slot in self.protection.slots.values()}
