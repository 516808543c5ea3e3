"""The projector's side of its statistics (``unsc_fast.statistics``): what it holds (keys, row
counts, covariance sums, reset), memory estimates, forget passes, and the hooks of sketched
layers."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Hashable, Iterable

import torch

from unsc_fast.statistics import sketch
from unsc_fast.statistics import batches, policies
from unsc_fast.statistics.store import key_set
from unsc_fast.training import batch_parts, eval_mode, model_device, progress_bar, to_device

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.statistics.observation import Observation


class StatisticsMixin:
    """Part of ``NullSpaceProjector``: the statistics it holds, what they cost, which keys."""

    @property
    def dtype(self) -> torch.dtype:
        """The accumulation dtype of the covariances (float32 or float64)."""
        return self.store.dtype

    @property
    def groups(self) -> list:
        """The labels / group names observed so far (forget passes aside, see ``forget_keys``)."""
        return [k for k in self._keys() if not policies.is_forget_key(k)]

    def count(self, key: Hashable, name: str) -> int:
        """Rows accumulated for layer ``name`` under label/group ``key``."""
        return self.store.rows(key, name)

    def covariance(self, name: str, keys: Iterable[Hashable] | None = None) -> torch.Tensor:
        """Uncentred covariance sum of layer ``name`` over ``keys`` (default: every group)."""
        self._layer(name)
        keys = self.groups if keys is None else [k for k in key_set(keys, "keys")]
        return self.store.kept_sum(name, keys)

    def reset(self, keys: Iterable[Hashable] | None = None) -> None:
        """Forget the stored covariances of ``keys`` (default: all). Bases stay until rebuilt."""
        keys = None if keys is None else key_set(keys, "keys")
        self.store.reset(keys)
        for key in list(self._sketches) if keys is None else keys:
            self._sketches.pop(key, None)

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

    def collect(self, loader, *, labels: bool | str | None = None, group: Hashable | None = None, device=None,
                forget: bool = False, progress: bool | None = None):
        """Observe every batch of ``loader`` (any iterable) in eval mode, without grad.

        A batch is ``(inputs, targets, ...)``, a tensor, or a dict of keyword inputs (Hugging
        Face: ``"labels"`` are the targets; an ``attention_mask`` keeps padding out, see
        ``observe``). ``labels=None`` decides from each batch (``unsc_fast.statistics.batches``): a
        classifier's targets (one per sample) are its labels, a language-model batch (a dict
        batch with per-token or no labels; integer (B, T) tokens with (B, T) targets) is one
        group. ``True``: always the targets; ``False``: never; ``"key"``: a dict batch's entry
        with one label per sequence (removed from the model's inputs). Inputs are moved to
        ``device`` (default: the model's). ``forget=True``: a request's forget data (see
        ``observe``). ``progress``: a tqdm bar (None: only on a terminal, after 2 s).
        The model's train/eval modes are restored afterwards.
        """
        device = model_device(self.model) if device is None else device
        bar = progress_bar(loader, "observing forget data" if forget else "observing", progress)
        with eval_mode(self.model), torch.no_grad():
            for batch in bar:
                args, kwargs, targets = batch_parts(to_device(batch, device))
                kwargs, chosen = batches.observed_labels(args, kwargs, targets, labels)
                with self.observe(labels=chosen, group=group, forget=forget):
                    self.model(*args, **kwargs)
        return self
