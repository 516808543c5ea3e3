"""One ``observe()`` block: the forward hooks and the all-or-nothing commit of each batch.

Hooks accumulate into pending buffers; the root module's forward hook commits them once
the whole forward has succeeded, after one finiteness check per layer (a NaN/Inf anywhere
in a column of the input shows up on the diagonal of ``x^T x``). A forward that raises
leaves nothing behind: the next forward (or the end of the block) starts from clean buffers.

Module hooks are global to the module, not to the thread: a forward that another thread runs
on the same model while the block is open would fire them too, and be filed under this
block's labels. So an ``Observation`` belongs to the thread that opened it: the hooks, the
discard and the commit do nothing in any other thread (those forwards run unrecorded, and
are counted in ``foreign_calls`` so that an empty block can say why).
"""
from __future__ import annotations

import functools
import threading
from typing import Hashable, Iterable

import torch
from torch import nn

from unsc_fast.adapters import LayerAdapter
from unsc_fast.layers import Protection
from unsc_fast.store import CovarianceStore


def label_groups(labels) -> tuple[int, list[tuple[Hashable, torch.Tensor]]]:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor (batch,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.detach().cpu()
    groups = [(int(value), (labels == value).nonzero().flatten()) for value in labels.unique().tolist()]
    return labels.numel(), groups


class Observation:
    """Pending per-(group, layer) covariance deltas of the forward in progress."""

    def __init__(self, store: CovarianceStore, protection: Protection, labels, group: Hashable) -> None:
        self.store = store
        self.protection = protection
        if labels is None:
            self.batch_size = None
            self.groups: list[tuple[Hashable, torch.Tensor | None]] = [(group, None)]
        else:
            self.batch_size, self.groups = label_groups(labels)
        self.pending: dict[tuple[Hashable, str], list] = {}  # (key, slot) -> [delta, rows]
        self.handles: list = []
        self.calls = 0  # layer forwards seen, committed or not
        self.foreign_calls = 0  # layer forwards run by other threads, never recorded
        self.thread = threading.get_ident()  # the thread whose forwards are recorded
        self.inputs_finite: dict[str, list] = {}  # per slot, this forward's input checks
        self._indices_on: dict[tuple[int, torch.device], torch.Tensor] = {}

    # hooks -------------------------------------------------------------------
    def attach(self, root: nn.Module, layers: Iterable[LayerAdapter]) -> None:
        for layer in layers:
            hook = functools.partial(self._accumulate, layer)
            self.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        self.handles.append(root.register_forward_pre_hook(lambda *_: self.discard()))
        self.handles.append(root.register_forward_hook(lambda *_: self.commit()))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.discard()

    def records(self) -> bool:
        """True in the thread that opened the block: only its forwards are observed."""
        return threading.get_ident() == self.thread

    def discard(self) -> None:
        if self.records():
            self.pending.clear()
            self.inputs_finite.clear()

    # accumulation -------------------------------------------------------------
    def _accumulate(self, layer: LayerAdapter, module, args, kwargs, output) -> None:
        if not self.records():
            self.foreign_calls += 1
            return
        if getattr(layer, "busy", False):
            return  # the adapter re-running its own module (attention's out_proj inputs)
        self.calls += 1
        batch = layer.batch_size(args, kwargs)
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(
                f"layer {layer.name!r}: labels has {self.batch_size} entries but the layer's input "
                f"has batch size {batch}; labels need one entry per sample along the batch dimension"
            )
        device = layer.weight.device
        with torch.no_grad():
            inputs_finite = _inputs_finite(args, kwargs)  # unsynchronised; read only if a delta is not finite
            for position, (key, index) in enumerate(self.groups):
                deltas = _SlotDeltas(self, key, device)
                chosen = None if index is None else self._index(position, index, device)
                rows = layer.accumulate_(deltas, args, kwargs, output, chosen)
                for own_name, count in rows.items():
                    slot = self.protection.slot(own_name).name
                    self.pending[(key, slot)][1] += count
                    self.inputs_finite.setdefault(slot, []).append(inputs_finite)

    def _index(self, position: int, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        cached = self._indices_on.get((position, device))
        if cached is None:
            cached = self._indices_on[(position, device)] = index.to(device)
        return cached

    # commit -------------------------------------------------------------------
    def commit(self) -> None:
        """Check every pending delta, then add them all to the store (this thread's forwards only)."""
        if not self.records():
            return
        pending, self.pending = self.pending, {}
        inputs_finite, self.inputs_finite = self.inputs_finite, {}
        if not pending:
            return
        finite = _finite_flags([_diagonal(delta) for delta, _ in pending.values()])
        for (key, name), ok in zip(pending, finite):
            if not ok:
                raise ValueError(_non_finite_message(key, name, pending[(key, name)][0], inputs_finite.get(name, [])))
        for (key, name), (delta, rows) in pending.items():
            self.store.add(key, name, delta, rows)


def _inputs_finite(args, kwargs) -> torch.Tensor | None:
    """Whether the floating-point tensors a layer received are all finite (a 0-d bool tensor,
    not synchronised), or None when it received none (embedding indices cannot be NaN)."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        return None
    flags = [_finite_flag(t) for t in tensors]
    return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()


def _finite_flag(t: torch.Tensor) -> torch.Tensor:
    """``isfinite(t).all()``. On CPU (no sync to avoid) a finite sum settles it in one pass
    where the check takes four (~6 % of an All-CNN observe); only a sum that is not finite
    (NaN/Inf inputs, or an overflow) takes the exact check."""
    if t.device.type == "cpu" and bool(torch.isfinite(t.sum())):
        return torch.tensor(True)
    return torch.isfinite(t).all()


def _non_finite_message(key, name: str, delta: torch.Tensor, inputs_finite: list) -> str:
    """Why a layer's ``x^T x`` is not finite: bad inputs, or finite inputs whose products
    overflowed the accumulation dtype (large activations in float32: the fix differs)."""
    if inputs_finite and all(flag is None or bool(flag) for flag in inputs_finite):
        return (
            f"layer {name!r}: overflow: the inputs are finite but x^T x exceeds the range of "
            f"{delta.dtype} (group {key!r}): use dtype=torch.float64 or rescale the inputs; "
            "nothing from this batch was kept"
        )
    return (
        f"layer {name!r}: the observed batch has NaN or Inf inputs (group {key!r}); "
        "nothing from this batch was kept"
    )


class _SlotDeltas(dict):
    """The pending accumulators of one key, looked up by an adapter's own slot names (a tied
    layer's slot resolves to the slot it shares); created on first use."""

    def __init__(self, observation: Observation, key: Hashable, device: torch.device) -> None:
        super().__init__()
        self.observation, self.key, self.device = observation, key, device

    def __missing__(self, own_name: str) -> torch.Tensor:
        slot = self.observation.protection.slot(own_name)
        entry = self.observation.pending.get((self.key, slot.name))
        if entry is None:
            entry = [slot.zeros(self.observation.store.dtype, self.device), 0]
            self.observation.pending[(self.key, slot.name)] = entry
        self[own_name] = entry[0]
        return entry[0]


def _diagonal(delta: torch.Tensor) -> torch.Tensor:
    """Where a NaN/Inf anywhere in the inputs shows up: the diagonal of x^T x (per group),
    or the counts themselves for a diagonal slot."""
    return delta if delta.dim() == 1 else delta.diagonal(dim1=-2, dim2=-1)


def _finite_flags(deltas: list[torch.Tensor]) -> list[bool]:
    """One host sync per device: is every (diagonal) tensor finite?"""
    flags: list[bool | None] = [None] * len(deltas)
    by_device: dict[torch.device, list[int]] = {}
    for i, delta in enumerate(deltas):
        by_device.setdefault(delta.device, []).append(i)
    for device, positions in by_device.items():
        checks = torch.stack([torch.isfinite(deltas[i]).all() for i in positions]).tolist()
        for i, ok in zip(positions, checks):
            flags[i] = ok
    return flags
