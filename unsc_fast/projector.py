"""NullSpaceProjector: per-layer input covariances, energy bases, and null-space projection.

UNSC (Chen et al., IJCAI 2024) confines each weight update ``dW`` of a layer to the null
space of the inputs ``a`` that the remaining data produces there: with ``U`` an orthonormal
basis of the dominant subspace of ``C_r = sum a a^T``, ``dW <- dW - dW U U^T`` gives
``dW a ~ 0`` (their Theorem 1), so outputs on the remaining data are unchanged to first order.

Covariances are kept per label (or named group), so a new deletion request only needs a
sum/subtraction and a fresh basis, not another pass over the remaining data.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Hashable, Iterable

import torch
from torch import nn

from unsc_fast import distributed, ops
from unsc_fast.layers import TrackedLayer, find_layers
from unsc_fast.observation import Observation

STATE_FORMAT = "unsc_fast.NullSpaceProjector/1"
DEFAULT_GROUP = "all"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DataParallel/DDP wrapper or a ``torch.compile`` module."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrappers):
        return model.module
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):  # torch.compile's OptimizedModule
        warnings.warn(
            "the model is compiled: hooks added after compilation do not fire in the compiled "
            "graph (pytorch#117758), so run the original module (model._orig_mod) inside "
            "observe(), or create the projector before compiling",
            UserWarning,
            stacklevel=3,
        )
        return original
    return model


class NullSpaceProjector:
    """Tracks every ``nn.Linear`` / ``nn.Conv2d`` weight of ``model`` (or those named in
    ``modules``) and projects their updates onto the null space of the remaining data.

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
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.threshold = ops.check_threshold(threshold)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        distributed.check_model(model)
        self.model = unwrap_model(model)
        if self.model is not model:  # names as the user knows them, "module." prefix or not
            modules = distributed.unprefixed_names(modules, (n for n, _ in self.model.named_modules()))
        self.dtype = dtype
        self.layers: dict[str, TrackedLayer] = find_layers(self.model, modules)
        self._covariances: dict[Hashable, dict[str, torch.Tensor]] = {}
        self._counts: dict[Hashable, dict[str, int]] = {}
        self._bases: dict[str, torch.Tensor] = {}
        self._complements: dict[str, torch.Tensor] = {}
        self.built_from: tuple = ()
        self.built_threshold: float | None = None
        self._observation: Observation | None = None

    # ------------------------------------------------------------------ observe
    @contextlib.contextmanager
    def observe(self, labels: torch.Tensor | None = None, *, group: Hashable | None = None):
        """Accumulate the tracked layers' input covariances for the forwards run inside.

        ``labels`` (batch,) files each sample's rows under its label; ``group`` files the
        whole batch under one name; with neither, under ``"all"``. Each forward of the model
        is committed whole or not at all: a batch that fails (label count mismatch,
        non-finite activations) leaves the stored covariances exactly as they were.
        The hooks are removed on exit, also when the body raises.
        """
        if self._observation is not None:
            raise RuntimeError("observe() is already active on this projector; it does not nest")
        if labels is not None and group is not None:
            raise ValueError("pass labels= or group=, not both")
        observation = Observation(self, labels, DEFAULT_GROUP if group is None else group)
        self._observation = observation
        try:
            observation.attach(self.model, self.layers.values())
            yield self
            observation.commit()
            if not observation.calls:
                warnings.warn(
                    "observe(): no tracked layer ran inside the block, so nothing was recorded "
                    "(was the model called, and not a compiled copy of it?)",
                    UserWarning,
                    stacklevel=3,
                )
        finally:
            observation.detach()
            self._observation = None
            distributed.reshard(self.model)  # FSDP2 keeps a root's weights gathered after a no-grad forward

    def collect(self, loader, *, labels: bool = True, group: Hashable | None = None, device=None):
        """Observe every ``(inputs, targets, ...)`` batch of ``loader`` in eval mode, without grad.

        The model's train/eval modes are restored afterwards.
        """
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
                    if device is not None:
                        inputs = inputs.to(device)
                    with self.observe(labels=targets if labels else None, group=group):
                        self.model(inputs)
        finally:
            for module, training in modes.items():
                module.training = training
        return self

    def _store(self, key: Hashable, name: str, delta: torch.Tensor, rows: int) -> None:
        per_layer = self._covariances.setdefault(key, {})
        if name in per_layer:
            per_layer[name].add_(delta)
        else:
            per_layer[name] = delta  # the observation hands its buffer over
        counts = self._counts.setdefault(key, {})
        counts[name] = counts.get(name, 0) + rows

    @property
    def groups(self) -> list:
        """The labels / group names observed so far."""
        return list(self._covariances)

    def count(self, key: Hashable, name: str) -> int:
        """Rows accumulated for layer ``name`` under label/group ``key``."""
        return self._counts.get(key, {}).get(name, 0)

    def covariance(self, name: str, keys: Iterable[Hashable] | None = None) -> torch.Tensor:
        """Uncentred covariance sum of layer ``name`` over ``keys`` (default: every group)."""
        self._layer(name)
        keys = self.groups if keys is None else list(keys)
        parts = [self._covariances[k][name] for k in keys if name in self._covariances.get(k, {})]
        if not parts:
            raise KeyError(f"layer {name!r} has no observed data in groups {keys}")
        return torch.stack(parts).sum(0)

    def reset(self, keys: Iterable[Hashable] | None = None) -> None:
        """Forget the stored covariances of ``keys`` (default: all). Bases stay until rebuilt."""
        for key in self.groups if keys is None else list(keys):
            self._covariances.pop(key, None)
            self._counts.pop(key, None)

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
    ) -> "NullSpaceProjector":
        """Basis per layer from the observed groups, less ``exclude`` (the forgotten labels).

        ``include`` restricts the groups summed; ``subtract`` removes groups whose data is
        also inside the kept ones (a sample-wise request observed separately). The basis is
        the smallest set of top eigenvectors holding ``threshold`` of the energy. On error
        the previous bases stay as they were. Returns ``self``.

        ``method`` (see ``ops.energy_basis``): ``"auto"`` (randomized sketch for wide layers
        whose rank is a small part of the width, else dense), ``"eigh"`` (dense: exact
        eigenvectors, also at the cut) or ``"randomized"``; ``generator`` seeds the sketch.

        Under ``torch.distributed`` (``process_group=None``: the default group when it is
        initialised with several processes; ``"local"``: this process alone) every rank must
        call ``build`` with the same arguments: covariances are summed over the ranks and
        every rank gets the same bases (see ``unsc_fast.distributed``).
        ``keep_covariances``: ``"all"`` keeps each rank's covariances for later requests,
        ``"rank0"`` moves them all onto rank 0 (other ranks keep only bases), ``"none"``
        drops them (a later request needs a new pass over the data).
        """
        threshold = self.threshold if threshold is None else ops.check_threshold(threshold)
        if method not in ops.METHODS:
            raise ValueError(f"build(): method must be one of {ops.METHODS}, got {method!r}")
        keep_covariances = distributed.check_keep(keep_covariances)
        exclude, subtract = _key_set(exclude, "exclude"), _key_set(subtract, "subtract")
        group = distributed.resolve_group(process_group)
        if group is not None:
            new_bases, new_complements, kept = distributed.build(
                self, group, exclude=exclude, include=include, subtract=subtract, threshold=threshold,
                generator=generator, method=method, keep_covariances=keep_covariances,
            )
            self._bases, self._complements = new_bases, new_complements
            self.built_from, self.built_threshold = tuple(kept), threshold
            return self
        if not self._covariances:
            raise RuntimeError("build() needs observed data: run the model inside observe() first")
        kept = self._kept_groups(self.groups, exclude, include, subtract)
        covariances = [self._kept_covariance(name, kept, subtract) for name in self.layers]
        bases = ops.energy_bases(covariances, threshold, generator, method=method)
        new_bases, new_complements = {}, {}
        for layer, basis in zip(self.layers.values(), bases):
            basis = basis.to(layer.weight.device)
            new_bases[layer.name] = basis
            if 2 * basis.shape[1] > layer.dim:  # cheaper to keep the null space than to remove U
                new_complements[layer.name] = ops.complement_basis(basis)
        self._bases, self._complements = new_bases, new_complements
        self.built_from = tuple(kept)
        self.built_threshold = threshold
        if keep_covariances == "none":
            self.reset()
        return self

    def _kept_groups(self, observed: list, exclude: set, include, subtract: set, stacklevel: int = 3) -> list:
        """The groups whose covariances a build sums (``observed``: over every rank, in order)."""
        unknown = (exclude | subtract | (set(include) if include is not None else set())) - set(observed)
        if unknown:
            warnings.warn(
                f"build(): groups {sorted(map(str, unknown))} were never observed; observed: "
                f"{sorted(map(str, observed))}",
                UserWarning,
                stacklevel=stacklevel,
            )
        candidates = observed if include is None else [k for k in observed if k in set(include)]
        kept = [k for k in candidates if k not in exclude and k not in subtract]
        if not kept:
            raise ValueError(
                f"build(): no group left after exclude={sorted(map(str, exclude))}; "
                f"observed: {sorted(map(str, observed))}"
            )
        return kept

    def _kept_covariance(self, name: str, kept: list, subtract: set) -> torch.Tensor:
        parts = [self._covariances[k][name] for k in kept if name in self._covariances[k]]
        if not parts:
            raise RuntimeError(
                f"layer {name!r} saw no input in groups {kept}: did its forward run inside observe()? "
                "Leave it out with modules=[...] if the model never calls it"
            )
        total = torch.stack(parts).sum(0)
        for key in subtract:
            removed = self._covariances.get(key, {}).get(name)
            if removed is not None:
                total -= removed
        return total

    # ------------------------------------------------------------------ project
    @property
    def built(self) -> bool:
        return bool(self._bases)

    def basis(self, name: str) -> torch.Tensor:
        """The (d, k) orthonormal basis of the remaining data's inputs kept for layer ``name``."""
        self._layer(name)
        if name not in self._bases:
            raise RuntimeError(f"no basis for layer {name!r} yet: call build() first")
        return self._bases[name]

    def ranks(self) -> dict[str, int]:
        """Kept dimensions per layer after the last build."""
        return {name: basis.shape[1] for name, basis in self._bases.items()}

    def project_(self) -> "NullSpaceProjector":
        """In place, for every tracked weight with a gradient: ``grad <- grad - grad U U^T``."""
        self._require_built()
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                self.project_tensor_(name, layer.weight.grad)
        return self

    def project_tensor_(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Project a weight-shaped ``tensor`` of layer ``name`` onto its null space, in place."""
        layer = self._layer(name)
        self._require_built()
        if tensor.shape != layer.weight.shape:
            raise ValueError(
                f"layer {name!r}: tensor of shape {tuple(tensor.shape)} does not match the weight "
                f"{tuple(layer.weight.shape)} (was the layer resized after build()?)"
            )
        rows = distributed.local_rows(tensor, name)  # a DTensor sharded by rows: this rank's rows
        matrix = layer.matrix_view(rows)
        complement = self._complements.get(name)
        if complement is not None:
            ops.restrict_(matrix, self._on_device(self._complements, name, rows.device))
        else:
            ops.project_(matrix, self._on_device(self._bases, name, rows.device))
        if not layer.matrix_is_view(rows):
            rows.copy_(matrix.view(rows.shape))  # reshape had to copy (e.g. channels_last)
        return tensor

    @staticmethod
    def _on_device(store: dict, name: str, device: torch.device) -> torch.Tensor:
        if store[name].device != device:
            store[name] = store[name].to(device)
        return store[name]

    def _layer(self, name: str) -> TrackedLayer:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tracked layer; tracked: {list(self.layers)}") from None

    def _require_built(self) -> None:
        if not self._bases:
            raise RuntimeError("the projector has no bases yet: observe() data, then call build()")
        for name, layer in self.layers.items():
            if self._bases[name].shape[0] != layer.dim:
                raise RuntimeError(
                    f"layer {name!r} now takes inputs of width {layer.dim} but its basis was built "
                    f"for {self._bases[name].shape[0]}: rebuild the projector"
                )

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Everything needed to resume, as tensors and plain values (``weights_only`` loads it)."""
        return {
            "format": STATE_FORMAT,
            "threshold": self.threshold,
            "dtype": str(self.dtype).removeprefix("torch."),
            "layers": {name: layer.dim for name, layer in self.layers.items()},
            "groups": [
                {
                    "key": key,
                    "covariances": dict(self._covariances[key]),
                    "counts": {n: torch.tensor(c, dtype=torch.int64) for n, c in self._counts[key].items()},
                }
                for key in self._covariances
            ],
            "bases": dict(self._bases),
            "built_from": list(self.built_from),
            "built_threshold": self.built_threshold,
        }

    def load_state_dict(self, state: dict) -> "NullSpaceProjector":
        """Restore a ``state_dict``; tensors follow each layer's weight device. All or nothing."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a NullSpaceProjector state (expected format {STATE_FORMAT!r})")
        saved = dict(state["layers"])
        mine = {name: layer.dim for name, layer in self.layers.items()}
        if saved != mine:
            missing = sorted(set(mine) - set(saved))
            extra = sorted(set(saved) - set(mine))
            resized = sorted(n for n in set(mine) & set(saved) if mine[n] != saved[n])
            raise ValueError(
                f"projector state does not fit this model: missing layers {missing}, unknown layers "
                f"{extra}, different input widths {resized}"
            )
        dtype = getattr(torch, state["dtype"])
        covariances, counts = {}, {}
        for entry in state["groups"]:
            key = entry["key"]
            covariances[key] = {
                n: t.to(self.layers[n].weight.device, dtype) for n, t in entry["covariances"].items()
            }
            counts[key] = {n: int(c) for n, c in entry["counts"].items()}
        bases = {n: t.to(self.layers[n].weight.device) for n, t in state["bases"].items()}
        complements = {n: ops.complement_basis(b) for n, b in bases.items() if 2 * b.shape[1] > mine[n]}
        self.threshold = ops.check_threshold(state["threshold"])
        self.dtype = dtype
        self._covariances, self._counts = covariances, counts
        self._bases, self._complements = bases, complements
        self.built_from = tuple(state["built_from"])
        self.built_threshold = state["built_threshold"]
        return self

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> "NullSpaceProjector":
        return self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def __repr__(self) -> str:
        status = f"built from {list(self.built_from)}" if self._bases else "not built"
        return (
            f"NullSpaceProjector({len(self.layers)} layers, threshold={self.threshold}, "
            f"groups={self.groups}, {status})"
        )


def _key_set(keys, argument: str) -> set:
    if isinstance(keys, (str, int)):
        keys = (keys,)
    try:
        return {k.item() if isinstance(k, torch.Tensor) else k for k in keys}
    except TypeError:
        raise TypeError(f"{argument} must be a label, a group name or an iterable of them, got {keys!r}") from None
