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
import math
import threading
from typing import Hashable, Iterable

import torch
from torch import nn

from unsc_fast.layers import TrackedLayer
from unsc_fast.store import CovarianceStore


def _label_groups(labels) -> tuple[int, list[tuple[Hashable, torch.Tensor]]]:
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

    def __init__(self, store: CovarianceStore, labels, group: Hashable) -> None:
        self.store = store
        if labels is None:
            self.batch_size = None
            self.groups: list[tuple[Hashable, torch.Tensor | None]] = [(group, None)]
        else:
            self.batch_size, self.groups = _label_groups(labels)
        self.pending: dict[tuple[Hashable, str], list] = {}  # (key, name) -> [delta, rows]
        self.handles: list = []
        self.calls = 0  # layer forwards seen, committed or not
        self.foreign_calls = 0  # layer forwards run by other threads, never recorded
        self.thread = threading.get_ident()  # the thread whose forwards are recorded
        self.inputs_finite: dict[str, list[torch.Tensor]] = {}  # per layer, this forward's input checks
        self._indices_on: dict[tuple[int, torch.device], torch.Tensor] = {}

    # hooks -------------------------------------------------------------------
    def attach(self, root: nn.Module, layers: Iterable[TrackedLayer]) -> None:
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
    def _accumulate(self, layer: TrackedLayer, module, args, kwargs, output) -> None:
        if not self.records():
            self.foreign_calls += 1
            return
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        self.calls += 1
        layer.check_input(x)
        batch = layer.batch_size(x)
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(
                f"layer {layer.name!r}: labels has {self.batch_size} entries but the layer's input "
                f"has batch size {batch} (shape {tuple(x.shape)}); labels need one entry per sample "
                "along dim 0"
            )
        rows_per_sample = _rows_per_sample(layer, x, output)
        with torch.no_grad():
            x = x.detach()
            # Kept (unsynchronised) to tell NaN/Inf inputs from an overflow of x^T x at commit.
            self.inputs_finite.setdefault(layer.name, []).append(torch.isfinite(x).all())
            for position, (key, index) in enumerate(self.groups):
                part = x if index is None else x.index_select(0, self._index(position, index, x.device))
                entry = self.pending.get((key, layer.name))
                if entry is None:
                    delta = torch.zeros(layer.dim, layer.dim, dtype=self.store.dtype, device=x.device)
                    entry = self.pending[(key, layer.name)] = [delta, 0]
                layer.accumulate_(entry[0], part)
                samples = batch if index is None else index.numel()
                entry[1] += samples * rows_per_sample

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
        finite = _finite_flags([delta for delta, _ in pending.values()])
        for (key, name), ok in zip(pending, finite):
            if not ok:
                raise ValueError(_non_finite_message(key, name, pending[(key, name)][0], inputs_finite.get(name, [])))
        for (key, name), (delta, rows) in pending.items():
            self.store.add(key, name, delta, rows)


def _non_finite_message(key, name: str, delta: torch.Tensor, inputs_finite: list[torch.Tensor]) -> str:
    """Why a layer's ``x^T x`` is not finite: bad inputs, or finite inputs whose products
    overflowed the accumulation dtype (large activations in float32: the fix differs)."""
    if inputs_finite and all(bool(flag) for flag in inputs_finite):
        return (
            f"layer {name!r}: overflow: the inputs are finite but x^T x exceeds the range of "
            f"{delta.dtype} (group {key!r}): use dtype=torch.float64 or rescale the inputs; "
            "nothing from this batch was kept"
        )
    return (
        f"layer {name!r}: the observed batch has NaN or Inf inputs (group {key!r}); "
        "nothing from this batch was kept"
    )


def _rows_per_sample(layer: TrackedLayer, x: torch.Tensor, output) -> int:
    if layer.kind == "linear":
        return math.prod(x.shape[1:-1]) if x.dim() > 1 else 1
    return output.shape[-1] * output.shape[-2]


def _finite_flags(deltas: list[torch.Tensor]) -> list[bool]:
    """One host sync per device: is the diagonal of every delta finite?"""
    flags: list[bool | None] = [None] * len(deltas)
    by_device: dict[torch.device, list[int]] = {}
    for i, delta in enumerate(deltas):
        by_device.setdefault(delta.device, []).append(i)
    for device, positions in by_device.items():
        checks = torch.stack([torch.isfinite(deltas[i].diagonal()).all() for i in positions]).tolist()
        for i, ok in zip(positions, checks):
            flags[i] = ok
    return flags
