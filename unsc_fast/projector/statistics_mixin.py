"""The projector's side of its statistics (``unsc_fast.statistics``): the plan chosen from the
memory budget (``unsc_fast.statistics.plan``), the room made before each batch (a fold into
one total, smaller sketches, or a refusal before anything is allocated), what it holds (keys,
row counts, covariance sums, reset), forget passes, the sketch hooks, ``collect`` and the
per-label statistics a per-class criterion reads."""
from __future__ import annotations

import math
import warnings
from typing import Hashable, Iterable, Iterator

import torch

from unsc_fast.adapters import LayerAdapter
from unsc_fast.solve import per_label, per_label_classes
from unsc_fast.solve import request as solve
from unsc_fast.statistics import batches, memory, policies
from unsc_fast.statistics import class_statistics as per_class
from unsc_fast.statistics import plan as planning
from unsc_fast.statistics.sketch import buffer_rows
from unsc_fast.statistics.sketch_observation import SketchFeed, SketchObservation, nbytes
from unsc_fast.statistics.store import CovarianceStore, key_set, listed
from unsc_fast.training import batch_parts, eval_mode, model_device, progress_bar, to_device


def sketch_units(layers: dict, protection) -> dict[str, list[str]]:
    """Layer -> its slot names, for every layer that can be sketched: its adapter yields rows
    (``input_rows``) and its slots are dense or grouped and its own (not shared by a tie)."""
    owners: dict[str, int] = {}
    for layer in layers.values():
        for slot in layer.slots():
            owners[protection.slot(slot.name).name] = owners.get(protection.slot(slot.name).name, 0) + 1
    units = {}
    for name, layer in layers.items():
        slots = layer.slots()
        if type(layer).input_rows is LayerAdapter.input_rows or any(s.kind == "diagonal" for s in slots):
            continue
        if any(protection.slot(s.name).name != s.name or owners[s.name] > 1 for s in slots):
            continue
        units[name] = [s.name for s in slots]
    return units


def user_sketch(sketch: dict | None, units: dict, layers: dict) -> dict[str, int]:
    """``sketch={layer: rows}`` as ``{slot: rows}``, checked."""
    if sketch is None:
        return {}
    unknown = sorted(set(sketch) - set(layers))
    if unknown:
        raise KeyError(f"sketch names untracked layers {unknown}; tracked: {list(layers)}")
    wrong = sorted(n for n in sketch if n not in units)
    if wrong:
        raise ValueError(f"layers {wrong} cannot be sketched (an embedding's counts, a weight tied to another "
                         "layer, or an adapter without input_rows); sketchable: " + str(sorted(units)))
    bad = {n: r for n, r in sketch.items() if isinstance(r, bool) or not isinstance(r, int) or r < 1}
    if bad:
        raise ValueError(f"sketch rows must be positive ints, got {bad}")
    return {slot: int(rows) for name, rows in sketch.items() for slot in units[name]}


class StatisticsMixin:
    """Part of ``NullSpaceProjector``: what its statistics cost, how they stay within the
    budget, which keys they hold and what a per-class criterion can read from them."""

    def _setup_statistics(self, statistics: str, memory_budget: int | None, num_labels: int | None,
                          dtype: torch.dtype | None, sketch: dict | None, class_rows: int | None) -> None:
        if statistics not in policies.POLICIES:
            raise ValueError(f"statistics must be one of {policies.POLICIES}, got {statistics!r}")
        for value, argument in ((memory_budget, "memory_budget"), (num_labels, "num_labels"), (class_rows, "class_rows")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{argument} must be a non-negative int or None, got {value!r}")
        self._units = sketch_units(self.layers, self.protection)
        devices = set(self._slot_devices.values())
        budget = memory_budget if memory_budget is not None else memory.default_budget(devices)
        limit = memory_budget if memory_budget is not None else memory.default_budget(devices, 1.0)
        source = "memory_budget=" if memory_budget is not None else "available memory"
        plan = planning.plan(statistics, self.protection.slots, self._units, user_sketch(sketch, self._units, self.layers),
                             num_labels, dtype, budget, limit, source, class_rows)
        if plan.over_budget:
            where = "memory_budget=" if memory_budget is not None else \
                f"the default budget ({memory.DEFAULT_FRACTION:.3g} of the available memory)"
            warnings.warn(f'statistics="auto": {plan.reason}: {where} of {budget:,} bytes is too small for these '
                          "layers (observe fewer with modules=[...], or pass a larger memory_budget=)",
                          UserWarning, stacklevel=4)
        if plan.policy == "total" and not plan.class_rows and class_rows is None and self._units:
            warnings.warn(f"statistics: one total is kept and the budget of {budget:,} bytes holds no class sketches "
                          f"beside it ({planning.CLASS_ROWS_MIN} rows per label at least): a per-class criterion "
                          "falls back to the total's (class_rows= to force some)", UserWarning, stacklevel=4)
        self._requested, self._given_budget, self._requested_dtype = statistics, memory_budget, dtype
        self._sketch_rows_fixed, self._class_rows_fixed = sketch is not None, class_rows is not None
        self.memory_budget, self.statistics, self._class_rows = plan.budget, plan.policy, plan.class_rows
        self._set_sketch_rows(plan.sketch_rows)
        self._sketches: dict = {}  # key -> slot -> sketch.SlotSketch (sketched slots, read by build)
        self._class_sketches: dict = {}  # label -> slot -> sketch.SlotSketch (beside one total)
        self._forget_labels: set = set()  # labels a labelled forget pass touched (one total)
        self.store = CovarianceStore(plan.dtype)

    def _set_sketch_rows(self, rows_by_slot: dict[str, int]) -> None:
        self._sketch_rows = dict(rows_by_slot)
        self._sketch_slots = {slot: layer for layer, slots in self._units.items() for slot in slots
                              if slot in rows_by_slot}
        self.sketch_rows = {layer: rows_by_slot[slots[0]] for layer, slots in self._units.items()
                            if slots[0] in rows_by_slot}

    # ------------------------------------------------------------------ estimates
    def memory_estimate(self, labels: int = 1, *, dtype: torch.dtype | None = None) -> "policies.MemoryEstimate":
        """Bytes the statistics of this model would take for ``labels`` labels, per policy and
        per layer, before observing anything (``print()`` it for a table)."""
        return policies.estimate(self._slot_sizes(), labels, dtype or self._requested_dtype)

    def _slot_sizes(self) -> dict[str, int]:
        """Numbers each slot's statistics hold (d^2 for a dense slot)."""
        return {slot.name: math.prod(slot.shape) for slot in self.protection.slots.values()}

    # ------------------------------------------------------------------ keys
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
        """Forget the stored covariances of ``keys`` (default: all). Bases stay until rebuilt.
        Under one total a label's rows are summed into it and cannot be taken out: resetting a
        label while the total holds rows is refused (it would drop only the label's sketches)."""
        keys = None if keys is None else key_set(keys, "keys")
        if keys is not None:
            self._refuse_reset_inside_total(keys)
        self.store.reset(keys)
        for table in (self._sketches, self._class_sketches):
            for key in list(table) if keys is None else keys:
                table.pop(key, None)
        if keys is None:
            self._forget_labels.clear()

    def _refuse_reset_inside_total(self, keys: set) -> None:
        if self.statistics != "total" or policies.TOTAL_KEY not in self.store.keys:
            return
        inside = [k for k in keys if k != policies.TOTAL_KEY and not policies.is_forget_key(k)]
        if inside:
            layers = [n for n in self.protection.slots if self.store.rows(policies.TOTAL_KEY, n)]
            raise ValueError(
                f"reset({listed(inside)}): under statistics='total' the rows of every label are summed into "
                f"one total (layers {layers}) and cannot be taken out of it; nothing was reset. To leave "
                "labels out, observe their data as a forget pass (observe(..., forget=True)) and "
                "build(exclude=...); to start again, reset() everything (or reset(['total'])) and observe "
                "the remaining data")

    def reset_forget(self) -> None:
        """Drop the forget passes observed so far (a new request starts from none)."""
        for key in self.forget_keys:
            self.store.reset([key])
            self._sketches.pop(key, None)
        self._forget_labels.clear()

    @property
    def forget_keys(self) -> list:
        """Keys of the forget passes observed and not reset (subtracted by ``build``)."""
        return [k for k in self._keys() if policies.is_forget_key(k)]

    def _keys(self) -> list:
        """Keys observed in the dense store or the sketches, in first-seen order."""
        return list(dict.fromkeys([*self.store.keys, *self._sketches]))

    @property
    def class_keys(self) -> list:
        """The labels / groups observed with statistics of their own (per-label matrices, slot
        sketches or class sketches), forget passes aside."""
        keys = [*self._sketches, *self._class_sketches] + (self.store.keys if self.statistics == "per_label" else [])
        return [k for k in dict.fromkeys(keys) if not policies.is_forget_key(k)]

    def class_statistics(self, slot_name: str, keys=None, *, process_group=None) -> Iterator["per_class.ClassStatistic"]:
        """Per label in ``keys`` (default: ``class_keys``), one at a time: ``(key, trace, gram)``
        for slot (or layer) ``slot_name``, with ``trace = tr(C_c)`` exact and ``gram <= C_c``
        (exact under per-label storage, a class sketch's ``B^T B`` beside one total). Read-only.
        Raises ``LookupError`` where a label has neither (see ``unsc_fast.statistics.class_statistics``).
        Under ``torch.distributed`` (``process_group`` as in ``build``) the statistics are
        pooled over the ranks, labels the union of theirs: every rank must call it alike."""
        from unsc_fast import distributed
        from unsc_fast.distributed import sketch as distributed_sketch

        statistics = per_class.class_statistics(self, slot_name, keys)  # checks the slot and policy now
        group = distributed.resolve_group(process_group)
        if group is None:
            return statistics
        return distributed_sketch.pooled_class_statistics(self, self._slot(slot_name), keys, group)

    def _per_label_bases(self, kept: list, subtracted: list, exclude: set, include, subtract: set, threshold: float,
                         generator, method: str) -> tuple[dict, dict]:
        """``build(criterion="per_label")`` on one process: exact per-label matrices (per-label
        storage), else the kept labels' class statistics beside one total; a sketched layer
        keeps the summed criterion (its per-label cut would need ``d x d`` eigenvectors)."""
        slots = self.protection.slots
        sketched = {n: s for n, s in slots.items() if n in self._sketch_slots}
        dense = {n: s for n, s in slots.items() if n not in sketched}
        bases, complements = {}, {}
        if sketched:
            warnings.warn(f'build(criterion="per_label"): layers {sorted(set(self._sketch_slots.values()))} are '
                          "sketched: their bases keep the threshold of the kept labels' summed energy (the per-label "
                          "cut needs d x d eigenvectors)", UserWarning, stacklevel=3)
            request = solve.sketch_keys(self.statistics, self._sketches, kept, subtracted, exclude, include, subtract)
            bases, complements = solve.local_bases(self.store, sketched, self._sketches, self._sketch_slots,
                                                   self._slot_devices, kept, subtracted, threshold, generator, method,
                                                   request)
        if self.statistics == "per_label":
            found = per_label.request_bases(self.store, dense, self._slot_devices, kept, subtracted, threshold,
                                            self._spectra, statistics=self.statistics, sketched=[])
        else:
            labels = [k for k in self.class_keys if k not in exclude and k not in subtract
                      and (include is None or k in include)]
            excluded = [k for k in self.class_keys if k not in labels]

            def excluded_energy(slot: str) -> float:
                return sum(s.trace for k in excluded if slot in self._class_sketches.get(k, {})
                           for s in self._class_sketches[k][slot].parts)

            found = per_label_classes.total_class_bases(
                self.store, dense, self._slot_devices, kept, subtracted, labels, threshold, self._spectra,
                lambda slot, keys: self.class_statistics(slot, keys), excluded_energy)
        bases.update(found[0])
        complements.update(found[1])
        return {name: bases[name] for name in slots}, complements

    # ------------------------------------------------------------------ room before a batch
    def _make_room(self, keys: list, forget: bool) -> None:
        """Before a batch filed under ``keys``: fold per-label storage into one total (auto),
        refuse it before allocating (explicit per_label), or shrink the sketches, so that the
        statistics stay within the budget."""
        mapped = [policies.FORGET_KEY if forget and self.statistics == "total" else
                  ((policies.FORGET_KEY, k) if forget else k) for k in keys]
        if self.statistics == "per_label":
            self._fit_per_label(mapped)
        if self.statistics == "total" and not forget:
            self._fit_class_sketches(keys)
        self._fit_slot_sketches([(policies.FORGET_KEY, k) if forget else k for k in keys])

    def _costs(self) -> planning.Costs:
        return planning.Costs(planning.slot_costs(self.protection.slots), dict(self._sketch_rows))

    def _fit_per_label(self, mapped: list) -> None:
        costs, size = self._costs(), self.store.dtype.itemsize
        sets = costs.set_bytes(size)
        if not sets:  # every slot sketched: nothing per label to fold or refuse (_fit_slot_sketches)
            return
        new = [k for k in mapped if k not in self.store.keys]
        labels = len(set(self.class_keys) | {k for k in mapped if not policies.is_forget_key(k)})
        need = (self.store.nbytes() + len(new) * sets + max((len(mapped) - len(new)) * sets, costs.solve_bytes(size))
                + costs.sketch_bytes(len(set(self._sketches) | set(mapped))))
        if self._requested == "auto" and need > self.memory_budget:
            dtype = self._requested_dtype or next(
                (d for d in (torch.float64, torch.float32) if costs.total(labels, d.itemsize) <= self.memory_budget),
                torch.float32)
            if not self._class_rows_fixed:
                self._class_rows = planning.class_rows_for(costs, labels, dtype.itemsize, self.memory_budget)
            per_class.fold_to_total(self, dtype, self._class_rows,
                                    f"{labels} label(s) would take per-label statistics to {need:,} bytes, over "
                                    f"memory_budget={self.memory_budget:,}")
            return
        if self._requested != "per_label":
            return
        current = self.store.nbytes() + nbytes(self._sketches)
        if self._given_budget is not None:
            over, limit = need > self._given_budget, f"memory_budget={self._given_budget:,}"
        else:
            available = memory.default_budget(set(self._slot_devices.values()), 1.0)
            over, limit = need - current > available, f"the {available:,} bytes of memory available now"
        if over:
            widest = max(costs.dense(), key=lambda s: s.numel)
            raise MemoryError(
                f'statistics="per_label": this batch\'s {len(new)} new key(s) {new[:5]} need {sets:,} bytes each '
                f"(the widest layer {widest.name!r}, d={widest.dim}, takes {widest.numel * size:,}), taking the "
                f"statistics from {current:,} to {need:,} bytes at their peak, over {limit}; nothing was observed. "
                'Options: statistics="auto" (folds into one total), statistics="total", sketch={layer: rows}, '
                "modules=[...], or a larger memory_budget=")

    def _fit_class_sketches(self, keys: list) -> None:
        if not self._class_rows or self._class_rows_fixed:
            return
        costs, size = self._costs(), self.store.dtype.itemsize
        labels = len(set(self._class_sketches) | set(keys))
        if planning.class_rows_for(costs, labels, size, self.memory_budget) >= self._class_rows:
            return
        # room for twice the labels where that leaves enough rows: labels tend to keep coming
        rows = planning.class_rows_for(costs, 2 * labels, size, self.memory_budget) or \
            planning.class_rows_for(costs, labels, size, self.memory_budget)
        if rows:
            for per_key in self._class_sketches.values():
                for sketch in per_key.values():
                    sketch.resize(rows)
            change = f"shrunk from {self._class_rows} to {rows} rows (B^T B <= C_c still holds, with less energy)"
        else:
            self._class_sketches.clear()
            change = "dropped: a per-class criterion falls back to the total's"
        warnings.warn(f"statistics: with {labels} labels the class sketches no longer fit memory_budget="
                      f"{self.memory_budget:,} bytes beside the total; {change}", UserWarning, stacklevel=6)
        self._class_rows = rows

    def _fit_slot_sketches(self, mapped: list) -> None:
        """Sketches chosen by "auto" shrink to fit the budget; the rows a user chose are kept,
        and refused before allocating past ``memory_budget=`` (or the memory available)."""
        if not self._sketch_slots:
            return
        keys = len(set(self._sketches) | set(mapped))
        if self._sketch_rows_fixed:
            need = self._costs().sketch_bytes(keys)
            if self._given_budget is not None:
                over, limit = need > self._given_budget, f"memory_budget={self._given_budget:,}"
            else:
                available = memory.default_budget(set(self._slot_devices.values()), 1.0)
                over, limit = need - nbytes(self._sketches) > available, f"the {available:,} bytes available now"
            if over:
                raise MemoryError(f"sketch={self.sketch_rows}: {keys} keys of sketches need about {need:,} bytes at "
                                  f"their peak, over {limit}; nothing was observed. Fewer rows, or statistics=\"auto\"")
            return
        labels = max(1, len(set(self.class_keys) | {k for k in mapped if not policies.is_forget_key(k)}))
        costs, size = self._costs(), self.store.dtype.itemsize
        dense = planning.Costs(costs.slots, {n: 0 for n in self._sketch_rows})
        rest = dense.per_label(labels, size) if self.statistics == "per_label" else dense.total(labels, size)
        per_row = planning.Costs(costs.slots, {n: 1 for n in self._sketch_rows}).sketch_bytes(keys)
        before = min(self._sketch_rows.values())
        rows = int(max(0, self.memory_budget - rest) // max(1, per_row))
        if rows >= before:
            return
        if rows < planning.SKETCH_ROWS_MIN:
            raise MemoryError(f"statistics: {keys} keys of sketched layers {sorted(set(self._sketch_slots.values()))} "
                              f"no longer fit memory_budget={self.memory_budget:,} bytes even at "
                              f"{planning.SKETCH_ROWS_MIN} rows; nothing was observed. Raise memory_budget=")
        for per_key in self._sketches.values():
            for sketch in per_key.values():
                sketch.resize(rows)
        self._set_sketch_rows({n: rows for n in self._sketch_rows})
        warnings.warn(f"statistics: {keys} keys of sketched layers: their sketches shrunk from {before} to {rows} "
                      f"rows to fit memory_budget={self.memory_budget:,} bytes", UserWarning, stacklevel=6)

    # ------------------------------------------------------------------ sketch hooks
    def _sketch_observation(self, batch_size: int | None, labelled: list, router, forget: bool) -> SketchObservation:
        """Hooks for the sketched slots (keys as the dense ones would have) and, beside one total,
        the class sketches (labels only, never a forget pass)."""
        slots = self.protection.slots
        main = SketchFeed(self._sketches, {n: (slots[n].groups, slots[n].dim, r, 2 * r) for n, r in self._sketch_rows.items()},
                          torch.float64, groups=[(router.key(key), index) for key, index in labelled])
        feeds = [main]
        if self.statistics == "total" and self._class_rows and not forget:
            l = self._class_rows
            dense = {n: (s.groups, s.dim, l, buffer_rows(l)) for n, s in slots.items()
                     if n not in self._sketch_rows and s.kind != "diagonal"}
            feeds.append(SketchFeed(self._class_sketches, dense, torch.float32, compact=True, groups=list(labelled)))
        return SketchObservation(self.protection, self.layers, feeds, batch_size)

    # ------------------------------------------------------------------ observing a loader
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
