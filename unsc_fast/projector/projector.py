"""NullSpaceProjector: per-layer input covariances, energy bases, and null-space projection.

UNSC (Chen et al., IJCAI 2024) confines each weight update ``dW`` of a layer to the null
space of the inputs ``a`` that the remaining data produces there: with ``U`` an orthonormal
basis of the dominant subspace of ``C_r = sum a a^T``, ``dW <- dW - dW U U^T`` gives
``dW a ~ 0`` (their Theorem 1), so outputs on the remaining data are unchanged to first order.

Covariances are kept per label (or named group) in a ``CovarianceStore``, so a new deletion
request only needs a sum/subtraction and a fresh basis, not another pass over the remaining data.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Hashable, Iterable

import torch
from torch import nn

from unsc_fast import distributed, ops
from unsc_fast.adapters import LayerAdapter
from unsc_fast.projection.bases import NullSpaceBases
from unsc_fast.projector.persistence import STATE_FORMAT  # noqa: F401 - where users found it
from unsc_fast.projector.persistence import PersistenceMixin
from unsc_fast.projector.statistics_mixin import StatisticsMixin
from unsc_fast.solve import lora, per_label
from unsc_fast.solve import request as solve
from unsc_fast.solve.checks import check_rows, warn_if_everything_blocked
from unsc_fast.statistics import policies
from unsc_fast.statistics.observation import Observation, label_groups
from unsc_fast.statistics.store import key_set
from unsc_fast.tracking import wrappers
from unsc_fast.tracking.layers import (Coverage, coverage, find_layers, plan_protection, slot_devices, slot_named,
                                        warn_unprotected)

DEFAULT_GROUP = "all"


class NullSpaceProjector(StatisticsMixin, PersistenceMixin):
    """Tracks every layer of ``model`` with a trainable weight that an adapter covers (Linear,
    Conv1d/2d/3d with any groups, transformers' Conv1D, MultiheadAttention, Embedding,
    RNN/LSTM/GRU, PEFT LoRA factors; see ``unsc_fast.adapters`` and ``unsc_fast.solve.lora``), or
    exactly those named in ``modules``, and projects their updates onto the null space of the
    remaining data (frozen layers cannot change: they are left out and reported). A parameter
    shared by several layers is protected
    against all of their inputs. ``coverage()`` says what is protected; ``strict=True``
    refuses a model with a trainable weight that no adapter protects.

    Statistics (``docs/statistics.md``): ``statistics="auto"`` (default) keeps a covariance per
    label where ``num_labels`` labels (None: unknown, folded later) fit ``memory_budget``
    bytes (None: ``unsc_fast.statistics.memory.DEFAULT_FRACTION`` of the memory available where the
    weights live), else one total (a request then brings one pass over its forget data)
    with small per-label ``class_rows``-row class sketches (None: as many as fit), and
    sketches the layers too wide for a ``d x d`` matrix; labels that outgrow the budget
    while observing are folded into the total, with a warning. ``"per_label"`` /
    ``"total"`` force a policy (refused before allocating where it cannot fit).
    ``dtype``: accumulation dtype (default float32 per label; float64 for a total where it
    fits, its subtraction cancels in fp32). ``sketch``: ``{layer name: rows}`` to sketch
    (``unsc_fast.statistics.sketch``: Frequent Directions, a stated energy guarantee, no subtraction).

    Usage::

        proj = NullSpaceProjector(model, threshold=0.99)
        with proj.observe(labels=y):       # hooks exist only inside this block
            model(x)
        proj.build(exclude=(3,))           # forget class 3
        loss.backward(); proj.project_()   # grad <- grad - grad U U^T
    """

    def __init__(
        self,
        model: nn.Module,
        threshold: float = 0.99,
        *,
        modules: Iterable[str] | None = None,
        dtype: torch.dtype | None = None,
        strict: bool = False,
        statistics: str = "auto",
        memory_budget: int | None = None,
        num_labels: int | None = None,
        sketch: dict[str, int] | None = None,
        class_rows: int | None = None,
    ) -> None:
        self.threshold = ops.check_threshold(threshold)
        wrappers.check_model(model)
        self.model = wrappers.unwrap_model(model)
        if self.model is not model:  # names as the user knows them, "module." prefix or not
            modules = wrappers.unprefixed_names(modules, (n for n, _ in self.model.named_modules()))
        self.layers: dict[str, LayerAdapter] = find_layers(self.model, modules)
        self.protection = plan_protection(self.layers)
        self._lora = lora.lora_factors(self.model)  # PEFT LoRA factors (unsc_fast.solve.lora)
        self._slot_devices = slot_devices(self.protection)
        report = self.coverage()
        if strict and report.unprotected_weights:
            raise ValueError(
                "strict=True: these trainable weights have no adapter and would not be protected: "
                + ", ".join(f"{r.name} {r.shape}" for r in report.unprotected_weights)
            )
        if modules is None:
            warn_unprotected(report)
        self._setup_statistics(statistics, memory_budget, num_labels, dtype, sketch, class_rows)
        self._spectra = per_label.SpectrumCache()  # criterion="per_label": the last request's eigenvectors
        self.solution = NullSpaceBases(self.protection)  # the bases of the last build
        self._observation: Observation | None = None

    # ------------------------------------------------------------------ observe
    @contextlib.contextmanager
    def observe(self, labels: torch.Tensor | None = None, *, group: Hashable | None = None, forget: bool = False):
        """Accumulate the tracked layers' input covariances for the forwards run inside.

        ``labels`` (batch,) files each sample's rows under its label; ``group`` files the
        whole batch under one name; with neither, under ``"all"``. A forward given an
        ``attention_mask`` keyword (B, T) is observed at its real tokens only
        (``unsc_fast.adapters.tokens``): padding never enters the statistics. Under
        ``statistics="total"`` every batch goes into the one total (labels and groups are
        not kept apart; labels are still checked). ``forget=True`` marks a pass over a
        request's forget data: the next ``build()`` subtracts it from the data it sums.
        Each forward of the model is committed whole or not at all: a batch that fails
        (label count mismatch, non-finite activations) leaves the stored covariances exactly
        as they were. The hooks are removed on exit, also when the body raises.

        Only the forwards run by the thread that entered the block are recorded: hooks are
        global to the module, so another thread using the same model meanwhile (a serving
        thread, a data-parallel replica's worker) would otherwise have its inputs filed
        under this block's labels. Those forwards run normally, unrecorded.
        """
        if self._observation is not None:
            raise RuntimeError("observe() is already active on this projector; it does not nest")
        if labels is not None and group is not None:
            raise ValueError("pass labels= or group=, not both")
        batch, labelled = label_groups(labels) if labels is not None else (
            None, [(DEFAULT_GROUP if group is None else group, None)])
        self._make_room([key for key, _ in labelled], forget)  # may fold into one total: before the router
        pooled = self.statistics == "total"  # one matrix per layer: labels checked, then pooled
        group = policies.TOTAL_KEY if pooled else DEFAULT_GROUP if group is None else group
        router = policies.StatisticsRouter(self.store, forget=forget, budget=None)
        observation = Observation(router, self.protection, labels, group, pool_labels=pooled)
        sketching = self._sketch_observation(batch, labelled, router, forget)
        self._observation = observation
        try:
            observation.attach(self.model, [l for n, l in self.layers.items() if n not in self.sketch_rows])
            if sketching:
                sketching.attach(self.model)
            yield self
            observation.commit()
            if forget and batch is not None and self.statistics == "total":
                self._forget_labels.update(key for key, _ in labelled)
            if not observation.calls and not sketching.calls:
                elsewhere = (
                    f"; {observation.foreign_calls} layer forwards ran in other threads, which "
                    "observe() never records: run the model in the thread that entered the block"
                    if observation.foreign_calls else ""
                )
                warnings.warn(
                    "observe(): no tracked layer ran inside the block, so nothing was recorded "
                    f"(was the model called, and not a compiled copy of it?){elsewhere}",
                    UserWarning,
                    stacklevel=3,
                )
        finally:
            observation.detach()
            sketching.detach()
            self._observation = None
            wrappers.reshard(self.model)  # FSDP2 keeps a root's weights gathered after a no-grad forward

    # -------------------------------------------------------------------- build
    def build(
        self,
        exclude: Iterable[Hashable] = (),
        *,
        include: Iterable[Hashable] | None = None,
        subtract: Iterable[Hashable] = (),
        threshold: float | None = None,
        generator: torch.Generator | None = None,
        method: str = "auto",
        process_group=None,
        keep_covariances: str = "all",
        allow_unobserved: bool = False,
        criterion: str = "total",
    ) -> "NullSpaceProjector":
        """Basis per layer from the observed groups, less ``exclude`` (the forgotten labels).

        ``include`` restricts the groups summed; ``subtract`` removes groups whose data is
        also inside the kept ones (a sample-wise request observed separately). The basis is
        the smallest set of top eigenvectors holding ``threshold`` of the energy. On error
        the previous bases stay as they were. Returns ``self``. A key in ``exclude`` /
        ``subtract`` / ``include`` that was never observed is an error (the class meant to be
        forgotten may have been observed under another key), unless ``allow_unobserved=True``.
        So is a layer left with 0 input rows (only empty batches observed: its basis would be
        empty and its updates unprojected) and a ``subtract`` group that is not inside the kept
        ones (the remainder is indefinite; see ``unsc_fast.solve.checks``).

        ``method`` (see ``ops.energy_basis``): ``"auto"`` (randomized sketch for wide layers
        whose rank is a small part of the width, else dense fp64 eigh, whose other eigenvectors
        are the complement), ``"eigh"`` (dense fp64 on every layer)
        or ``"randomized"``; ``generator`` seeds the sketch.

        Under ``torch.distributed`` (``process_group=None``: the default group when it is
        initialised with several processes; ``"local"``: this process alone) every rank must
        call ``build`` with the same arguments: covariances are summed over the ranks and
        every rank gets the same bases (see ``unsc_fast.distributed``).
        ``keep_covariances``: ``"all"`` keeps each rank's covariances for later requests,
        ``"rank0"`` moves them all onto rank 0 (other ranks keep only bases), ``"none"``
        drops them (a later request needs a new pass over the data).

        ``criterion``: ``"total"`` (the summed covariance keeps ``threshold`` of its energy) or
        ``"per_label"`` (every kept label keeps ``threshold`` of its own energy in every layer:
        ``unsc_fast.solve.per_label``; dense fp64 eigenvectors, one process; a rebuild of the
        same request at another threshold reuses the solve). It reads exact per-label matrices,
        or under one total each label's class sketch (``class_statistics``: a conservative
        bound, ``unsc_fast.solve.per_label_classes``); sketched layers keep the summed criterion
        (with a warning); ``solve.per_label_classes.PerLabelUnavailable`` where neither exists.
        """
        threshold = self.threshold if threshold is None else ops.check_threshold(threshold)
        criterion = solve.check_criterion(criterion)
        if method not in ops.EIGENSOLVERS:
            raise ValueError(f"build(): method must be one of {ops.EIGENSOLVERS}, got {method!r}")
        keep_covariances = solve.check_keep(keep_covariances)
        exclude, subtract = key_set(exclude, "exclude"), key_set(subtract, "subtract")
        include = None if include is None else key_set(include, "include")
        group = distributed.resolve_group(process_group)
        if group is not None and criterion == "per_label":
            raise NotImplementedError('build(criterion="per_label") runs on one process; under torch.distributed '
                                      'use criterion="total" (or build with process_group="local" on pooled statistics)')
        if group is not None:
            new_bases, new_complements, kept = distributed.build(
                self.store, self.protection.slots, self._slot_devices, group, exclude=exclude, include=include, subtract=subtract,
                threshold=threshold, generator=generator, method=method, keep_covariances=keep_covariances,
                allow_unobserved=allow_unobserved, statistics=self.statistics, sketches=self._sketches,
                sketch_rows=self._sketch_rows, class_sketches=self._class_sketches,
            )
            lora.start_zero_adapters_(self._lora, self.protection, new_bases, self.store)
            warn_if_everything_blocked(self.protection.slots, new_bases)
            self.solution.install(new_bases, new_complements, built_from=kept, threshold=threshold)
            return self
        if not self.groups:
            raise RuntimeError("build() needs observed data: run the model inside observe() first")
        kept, subtracted = solve.request_keys(self.store, self.statistics, self.groups, self.forget_keys, exclude,
                                              include, subtract, allow_unobserved)
        check_rows(self.store, self.protection.slots, kept, subtracted)
        if criterion == "per_label":
            new_bases, solved_complements = self._per_label_bases(kept, subtracted, exclude, include, subtract,
                                                                  threshold, generator, method)
        else:
            sketch_request = solve.sketch_keys(self.statistics, self._sketches, kept, subtracted, exclude, include,
                                               subtract)
            new_bases, solved_complements = solve.local_bases(
                self.store, self.protection.slots, self._sketches, self._sketch_slots, self._slot_devices, kept,
                subtracted, threshold, generator, method, sketch_request)
        lora.start_zero_adapters_(self._lora, self.protection, new_bases, self.store)  # B = 0: A into the null space
        warn_if_everything_blocked(self.protection.slots, new_bases)
        self.solution.install(new_bases, solved_complements, built_from=kept, threshold=threshold)
        if keep_covariances == "none":
            self.reset()
        return self

    def build_incremental(self, exclude: Iterable[Hashable] = (), *, class_thresholds=None) -> "NullSpaceProjector":
        """The official UNSC code's basis: grown class by class over the kept labels, in sorted
        order, each class adding directions until its own threshold of its energy is inside
        (``unsc_fast.solve.incremental``). ``class_thresholds``: ``None`` (the official rule
        ``0.97 + 0.003 * label``, capped at 0.997), a float, a mapping label -> float, or a
        callable ``(label, position) -> float``. ``build`` (one energy basis of the summed
        covariance) stays the default. Returns ``self``."""
        from unsc_fast.solve import incremental

        if self.statistics == "total" or self._sketch_slots:
            raise ValueError('build_incremental() grows the basis from per-label covariances: it needs '
                             'statistics="per_label" and no sketched layer')
        if not self.store:
            raise RuntimeError("build_incremental() needs observed data: run the model inside observe() first")
        kept = self.store.kept_keys(self.groups, key_set(exclude, "exclude"), None, set())
        kept = sorted(kept, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k)))
        thresholds = incremental.class_thresholds(kept, class_thresholds)
        bases = {name: b.to(self._slot_devices[name])
                 for name, b in incremental.incremental_bases(self.store, self.protection.slots, kept, thresholds).items()}
        lora.start_zero_adapters_(self._lora, self.protection, bases, self.store)
        self.solution.install(bases, built_from=kept, threshold=max(thresholds))
        return self

    # ------------------------------------------------------------------ project
    @property
    def built(self) -> bool:
        return bool(self.solution)

    @property
    def built_from(self) -> tuple:
        """The keys the current bases were built from."""
        return self.solution.built_from

    @property
    def built_threshold(self) -> float | None:
        return self.solution.threshold

    @property
    def _bases(self) -> dict:
        return self.solution.bases

    @property
    def _complements(self) -> dict:
        return self.solution.complements

    def basis(self, name: str) -> torch.Tensor:
        """The basis kept for layer (or slot) ``name``: (d, k) orthonormal for a dense slot,
        (g, d, k) zero-padded per group for a grouped one, a bool mask of seen tokens for an
        embedding."""
        slot = self._slot(name)
        if slot.name not in self._bases:
            raise RuntimeError(f"no basis for layer {name!r} yet: call build() first")
        return self._bases[slot.name]

    def ranks(self) -> dict[str, int | list[int]]:
        """Kept dimensions per slot after the last build (one per group for grouped slots)."""
        return self.solution.ranks()

    def coverage(self) -> Coverage:
        """Every parameter of the model: protected, frozen or trained unprotected, with shares."""
        return coverage(self.model, self.protection, self.layers)

    def protects(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a tracked weight (after build: whether anything of it is kept)."""
        uses = self.protection.uses.get(param)
        return uses is not None and self.solution.protects(uses)

    def residual(self, param: torch.Tensor, change: torch.Tensor) -> float:
        """``||dW U|| / ||dW||`` for a change ``dW`` of ``param`` (worst over its uses): at
        rounding level when the change respects the null space."""
        self._require_built()
        return self.solution.residual(change, self.protection.uses[param])

    def project_(self) -> "NullSpaceProjector":
        """In place, for every tracked weight with a gradient: ``grad <- grad - grad U U^T``."""
        self._require_built()
        for param in self.protection.uses:
            if param.grad is not None:
                self.project_parameter_(param, param.grad)
        return self

    def project_tensor_(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Project a tensor shaped like layer ``name``'s weight onto its null space, in place
        (against every layer that shares that weight)."""
        return self.project_parameter_(self._layer(name).weight, tensor)

    def project_parameter_(self, param: torch.Tensor | str, tensor: torch.Tensor) -> torch.Tensor:
        """Project a ``param``-shaped ``tensor`` onto the null space of all of ``param``'s uses.

        ``param`` may be given by name (``"encoder.0.weight"``); the optimizer does so, which
        lets torch.compile specialise one graph per layer instead of one with dynamic shapes.
        """
        self._require_built()
        if isinstance(param, str):
            param = self._parameter(param)
        uses = self.protection.uses.get(param)
        if uses is None:
            raise KeyError("the parameter is not tracked by this projector")
        if tensor.shape != param.shape:
            raise ValueError(
                f"parameter {uses[0].name!r}: tensor of shape {tuple(tensor.shape)} does not match "
                f"{tuple(param.shape)} (was the layer resized after build()?)"
            )
        return self.solution.apply_(tensor, uses)

    def _layer(self, name: str) -> LayerAdapter:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tracked layer; tracked: {list(self.layers)}") from None

    def _parameter(self, name: str) -> torch.Tensor:
        for param, uses in self.protection.uses.items():
            if any(use.name == name for use in uses):
                return param
        raise KeyError(f"{name!r} is not a tracked parameter; tracked: {list(self.protection.names.values())}")

    def _slot(self, name: str):
        """A slot by layer name (its first slot) or by slot name."""
        return slot_named(self.layers, self.protection, name)

    def _require_built(self) -> None:
        self.solution.require_built()

    def __repr__(self) -> str:
        status = f"built from {list(self.built_from)}" if self._bases else "not built"
        return (
            f"NullSpaceProjector({len(self.layers)} layers, threshold={self.threshold}, "
            f"groups={self.groups}, {status})"
        )

