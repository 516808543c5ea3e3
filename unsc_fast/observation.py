"""One ``observe()`` block: the forward hooks and the all-or-nothing commit of each batch.

Hooks accumulate into pending buffers; the root module's forward hook commits them once
the whole forward has succeeded, after one finiteness check per layer (a NaN/Inf anywhere
in a column of the input shows up on the diagonal of ``x^T x``). A forward that raises
leaves nothing behind: the next forward (or the end of the block) starts from clean buffers.
"""
from __future__ import annotations

import functools
import math
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

    def discard(self) -> None:
        self.pending.clear()

    # accumulation -------------------------------------------------------------
    def _accumulate(self, layer: TrackedLayer, module, args, kwargs, output) -> None:
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
        """Check every pending delta, then add them all to the store."""
        pending, self.pending = self.pending, {}
        if not pending:
            return
        finite = _finite_flags([delta for delta, _ in pending.values()])
        for (key, name), ok in zip(pending, finite):
            if not ok:
                raise ValueError(
                    f"layer {name!r}: the observed batch has NaN or Inf inputs (group {key!r}); "
                    "nothing from this batch was kept"
                )
        for (key, name), (delta, rows) in pending.items():
            self.store.add(key, name, delta, rows)


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
