"""Forward hooks that feed sketches (``unsc_fast.statistics.sketch``) from the rows each adapter produces.

Two kinds of sketch are fed the same way, each a ``SketchFeed``:

* the **slot sketches** of the layers too wide for a ``d x d`` matrix, which the build reads
  (keys as the dense statistics: labels, groups, forget passes);
* the small **class sketches** kept per label beside one total (``statistics="total"``), which
  ``class_statistics`` reads (labels only, never a forget pass).

Rows come from ``LayerAdapter.input_rows``: the same rows whose covariance the dense path
accumulates (a convolution's patches are materialised there in chunks, which the dense
path's implicit im2col avoids: the price of sketching a convolution). Each forward is kept
whole or not at all, as in ``observation.Observation``: a sketch is copied the first time a
forward touches it (a snapshot sharing its rows, which are never modified in place), and a
forward that fails (non-finite rows, a bad label count, an error in the model) puts them back.
A forward with an ``attention_mask`` feeds its real tokens only, as the dense path does
(``adapters.tokens``). A layer whose batch is ``k`` whole multiples of the labels in a forward
whose input has one entry per label (window attention) is read as ``k`` consecutive entries per
sample, as in ``observation.Observation``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from unsc_fast.adapters.tokens import TokenMask, padding_mask
from unsc_fast.statistics.observation import warn_windows, window_entries, windows_per_sample
from unsc_fast.statistics.sketch import SlotSketch
from unsc_fast.training import leading_size


@dataclass
class SketchFeed:
    """Where one kind of sketch lives: ``sketches[key][slot]``, the slots it covers with their
    ``(groups, d, rows, capacity)``, the dtype, and whether a sketch is compacted to ``l``
    rows after each forward (class sketches, to keep their memory at rest)."""

    sketches: dict
    slots: dict[str, tuple[int, int, int, int]]
    dtype: torch.dtype
    compact: bool = False
    groups: list = field(default_factory=list)  # [(key, sample indices or None)] of this block

    def new(self, slot: str, device) -> SlotSketch:
        groups, dim, rows, capacity = self.slots[slot]
        return SlotSketch(dim, groups, rows, self.dtype, device, capacity)


class SketchObservation:
    """The hooks of one ``observe()`` block for every layer that has a sketched slot."""

    def __init__(self, protection, layers: dict, feeds: list[SketchFeed], batch_size: int | None = None) -> None:
        self.protection, self.feeds = protection, [f for f in feeds if f.slots and f.groups]
        self.batch_size = batch_size  # labels' length, checked against every sketched layer's batch
        covered = {slot for feed in self.feeds for slot in feed.slots}
        self.layers = [layer for layer in layers.values()
                       if any(protection.slot(s.name).name in covered for s in layer.slots())]
        self.handles: list = []
        self.saved: dict = {}  # (feed index, key, slot) -> the sketch before this forward (None: new)
        self.calls = 0
        self.thread = threading.get_ident()
        self.token_mask: torch.Tensor | None = None  # this forward's real tokens (attention_mask)
        self.root_batch: int | None = None  # the leading size of this forward's first input

    def __bool__(self) -> bool:
        return bool(self.layers)

    def attach(self, root) -> None:
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_hook(
                lambda module, args, kwargs, output, layer=layer: self._record(layer, args, kwargs, output),
                with_kwargs=True))
        self.handles.append(root.register_forward_pre_hook(self._begin, with_kwargs=True))
        self.handles.append(root.register_forward_hook(lambda *_: self.commit()))

    def _begin(self, module, args, kwargs) -> None:
        """A new forward of the root (this thread's only): undo a failed one, read its padding mask."""
        self.restore()
        if threading.get_ident() == self.thread:
            self.token_mask = padding_mask(kwargs)
            self.root_batch = leading_size(args, kwargs)

    def _chosen(self, layer, index):
        """What ``input_rows`` selects: the group's samples, or under a mask its real tokens."""
        if self.token_mask is None:
            return index
        if not layer.per_token:
            raise ValueError(
                f"layer {layer.name!r}: a {type(layer.module).__name__}'s rows are not one per token, so the "
                "forward's attention_mask cannot select its real tokens: observe without attention_mask, or "
                "leave the layer out with modules=[...]"
            )
        mask = self.token_mask.to(layer.weight.device)
        if index is not None:
            chosen = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
            chosen[index.to(mask.device)] = True
            mask = mask & chosen[:, None]
        return TokenMask(mask, layer.name)

    def _record(self, layer, args, kwargs, output) -> None:
        if threading.get_ident() != self.thread or getattr(layer, "busy", False):
            return
        self.calls += 1
        masked = self.token_mask is not None  # the mask lines each layer's rows up with the sequences
        batch, windows = layer.batch_size(args, kwargs), 1
        if self.batch_size is not None and not masked and batch != self.batch_size:
            if self.root_batch == self.batch_size:  # the forward's input has one entry per label
                windows = windows_per_sample(batch, self.batch_size)
            if windows > 1:
                warn_windows(layer.name, batch, self.batch_size)
            else:
                raise ValueError(
                    f"layer {layer.name!r}: labels has {self.batch_size} entries but the layer's input has batch "
                    f"size {batch}; labels need one entry per sample along the batch dimension"
                )
        with torch.no_grad():
            for position, feed in enumerate(self.feeds):
                for key, index in feed.groups:
                    touched = set()
                    if index is not None:
                        index = window_entries(index, windows)
                    for own, group, rows in layer.input_rows(args, kwargs, output, self._chosen(layer, index)):
                        slot = self.protection.slot(own).name
                        if slot not in feed.slots:
                            continue
                        try:
                            self._sketch(position, feed, key, slot, rows.device).update(group, rows)
                        except ValueError:
                            raise ValueError(f"layer {layer.name!r}: the observed batch has NaN or Inf inputs "
                                             f"(group {key!r}); nothing was kept") from None
                        touched.add(slot)
                    for slot in touched if feed.compact else ():
                        feed.sketches[key][slot].compact()  # at rest again: l rows beside the saved ones

    def _sketch(self, position: int, feed: SketchFeed, key, slot: str, device) -> SlotSketch:
        per_key = feed.sketches.setdefault(key, {})
        if (position, key, slot) not in self.saved:
            current = per_key.get(slot)
            self.saved[(position, key, slot)] = None if current is None else current.snapshot()
        if slot not in per_key:
            per_key[slot] = feed.new(slot, device)
        return per_key[slot]

    def commit(self) -> None:
        if threading.get_ident() == self.thread:
            self.saved.clear()

    def restore(self) -> None:
        """Put back every sketch a failed forward touched (nothing to do after a commit)."""
        if threading.get_ident() != self.thread:
            return
        for (position, key, slot), before in self.saved.items():
            per_key = self.feeds[position].sketches.get(key, {})
            if before is None:
                per_key.pop(slot, None)
                if not per_key:
                    self.feeds[position].sketches.pop(key, None)
            else:
                per_key[slot] = before
        self.saved.clear()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.restore()


def nbytes(sketches: dict) -> int:
    """Bytes held by ``sketches[key][slot]``."""
    return sum(s.nbytes for per_key in sketches.values() for s in per_key.values())
