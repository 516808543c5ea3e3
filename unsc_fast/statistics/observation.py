"""One ``observe()`` block: the forward hooks and the all-or-nothing commit of each batch.

Hooks accumulate into pending buffers; the root module's forward hook commits them once
the whole forward has succeeded, after one finiteness check per layer (a NaN/Inf anywhere
in a column of the input shows up on the diagonal of ``x^T x``). A forward that raises
leaves nothing behind: the next forward (or the end of the block) starts from clean buffers.

A forward with an ``attention_mask`` keyword (Hugging Face batches) is observed at its real
tokens only: the root module's forward pre-hook reads the mask, and every layer keeps the
rows of real tokens (``adapters.tokens``), per label group where there are labels.

Module hooks are global to the module, not to the thread: a forward that another thread runs
on the same model while the block is open would fire them too, and be filed under this
block's labels. So an ``Observation`` belongs to the thread that opened it: the hooks, the
discard and the commit do nothing in any other thread (those forwards run unrecorded, and
are counted in ``foreign_calls`` so that an empty block can say why).

Broadcast inputs: under ``labels`` with n entries, a layer input whose batch dimension is 1
while other layers of the same forward see the n samples (Hugging Face position ids
``(1, T)``, broadcast over the batch) is used by every sample. Its rows are counted once for
each sample: each label's statistics get ``n_label`` times the input's covariance, which is
what the model does with it. A forward in which no layer saw the n samples is refused (the
labels do not match the batch). Without labels, a forward of token ids ``(B, T)`` (an integer
tensor as the model's first input or ``input_ids=``) counts such an input ``B`` times too, as
``attention_mask`` does: a total's counts then match what its forget pass subtracts.

Windowed inputs: in a forward where some layer saw the ``n`` labelled samples, a layer whose
batch dimension is a whole multiple ``k n`` of them (Swin's window attention runs on ``B x
windows`` windows) is read sample-major, ``k`` consecutive entries per sample, as Hugging Face's
and timm's window partitions lay them out, with a warning naming the layer. A forward where no
layer saw ``n`` is refused (too few labels, not windows). A model that interleaves samples the other way would file rows
under the wrong labels there: leave such layers out (``modules=``) or observe without labels.
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Hashable, Iterable

import torch
from torch import nn

from unsc_fast.adapters import LayerAdapter
from unsc_fast.adapters.tokens import TokenMask, padding_mask
from unsc_fast.tracking.layers import Protection
from unsc_fast.statistics.batches import is_token_ids
from unsc_fast.statistics.store import CovarianceStore, coordinate_energies


def label_groups(labels) -> tuple[int, list[tuple[Hashable, torch.Tensor]]]:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor (batch,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.detach().cpu()
    groups = [(int(value), (labels == value).nonzero().flatten()) for value in labels.unique().tolist()]
    return labels.numel(), groups


def _token_batch(args, kwargs) -> int | None:
    """The number of sequences of a forward whose input is token ids ``(B, T)`` (the first
    positional argument or ``input_ids=``), else None."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.shape[0]) if is_token_ids(ids) and ids.dtype != torch.bool else None


class Observation:
    """Pending per-(group, layer) covariance deltas of the forward in progress."""

    def __init__(self, store: CovarianceStore, protection: Protection, labels, group: Hashable, *,
                 pool_labels: bool = False) -> None:
        """``pool_labels``: file every sample under ``group`` (the total policy keeps no
        per-label split) while still checking ``labels`` as under every other policy."""
        self.store = store
        self.protection = protection
        self.groups: list[tuple[Hashable, torch.Tensor | None]] = [(group, None)]
        self.batch_size = None
        if labels is not None:
            self.batch_size, by_label = label_groups(labels)
            if not pool_labels:
                self.groups = by_label
        self.pending: dict[tuple[Hashable, str], list] = {}  # (key, slot) -> [delta, rows]
        self.handles: list = []
        self.calls = 0  # layer forwards seen, committed or not
        self.foreign_calls = 0  # layer forwards run by other threads, never recorded
        self.thread = threading.get_ident()  # the thread whose forwards are recorded
        self.inputs_finite: dict[str, list] = {}  # per slot, this forward's input checks
        self.broadcast_layers: list[str] = []  # this forward's layers whose batch of 1 served every sample
        self.windowed_layers: list[tuple[str, int]] = []  # this forward's layers with k entries per sample: (name, batch)
        self.saw_labelled_batch = False  # whether a layer of this forward saw one sample per label
        self.row_dtypes: dict[str, set] = {}  # per slot, this forward's floating input dtypes
        self._indices_on: dict[tuple[int, torch.device, int], torch.Tensor] = {}
        self.token_mask: torch.Tensor | None = None  # this forward's real tokens (attention_mask)
        self.token_batch: int | None = None  # sequences of this unlabelled forward of token ids
        self._token_masks_on: dict[tuple[int, torch.device], torch.Tensor] = {}

    # hooks -------------------------------------------------------------------
    def attach(self, root: nn.Module, layers: Iterable[LayerAdapter]) -> None:
        for layer in layers:
            hook = functools.partial(self._accumulate, layer)
            self.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        self.handles.append(root.register_forward_pre_hook(self._begin, with_kwargs=True))
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
            self.broadcast_layers.clear()
            self.windowed_layers.clear()
            self.saw_labelled_batch = False
            self.row_dtypes.clear()
            self.token_mask = None
            self._token_masks_on.clear()

    def _begin(self, module, args, kwargs) -> None:
        """A new forward of the root: clean buffers, and its padding mask (if any)."""
        self.discard()
        if not self.records():
            return
        self.token_mask = padding_mask(kwargs)
        self.token_batch = _token_batch(args, kwargs) if self.batch_size is None and self.token_mask is None else None
        if self.token_mask is not None and self.batch_size is not None and self.token_mask.shape[0] != self.batch_size:
            raise ValueError(f"labels has {self.batch_size} entries but attention_mask {tuple(self.token_mask.shape)} "
                             "has another batch size; labels need one entry per sequence")

    # accumulation -------------------------------------------------------------
    def _accumulate(self, layer: LayerAdapter, module, args, kwargs, output) -> None:
        if not self.records():
            self.foreign_calls += 1
            return
        if getattr(layer, "busy", False):
            return  # the adapter re-running its own module (attention's out_proj inputs)
        self.calls += 1
        if self.token_mask is not None and not layer.per_token:
            raise ValueError(
                f"layer {layer.name!r}: a {type(layer.module).__name__}'s rows are not one per token, so the "
                "forward's attention_mask cannot select its real tokens: observe without attention_mask, or "
                "leave the layer out with modules=[...]"
            )
        batch = layer.batch_size(args, kwargs)
        masked = self.token_mask is not None  # the mask lines each layer's rows up with the sequences
        sequences = self.batch_size if self.batch_size is not None else self.token_batch
        broadcast = not masked and sequences is not None and batch == 1 and sequences > 1
        windows = windows_per_sample(batch, self.batch_size) if not masked else 1
        if self.batch_size is not None and not masked and batch != self.batch_size and not broadcast and windows == 1:
            raise ValueError(_mismatch(layer.name, self.batch_size, batch))
        if windows > 1:
            self.windowed_layers.append((layer.name, batch))
        self.saw_labelled_batch |= self.batch_size is not None and (masked or batch == self.batch_size)
        device = layer.weight.device
        with torch.no_grad():
            inputs_finite = _inputs_finite(args, kwargs)  # unsynchronised; read only if a delta is not finite
            row_dtype = _coarsest_dtype(args, kwargs)
            if broadcast:
                if self.batch_size is not None:
                    self.broadcast_layers.append(layer.name)
                self._accumulate_broadcast(layer, args, kwargs, output, device, inputs_finite, row_dtype, sequences)
                return
            for position, (key, index) in enumerate(self.groups):
                deltas = _SlotDeltas(self, key, device)
                if self.token_mask is not None:
                    chosen = TokenMask(self._token_mask(position, index, device), layer.name)
                else:
                    chosen = None if index is None else self._index(position, index, device, windows)
                rows = layer.accumulate_(deltas, args, kwargs, output, chosen)
                self._count(key, rows, inputs_finite, row_dtype)

    def _accumulate_broadcast(self, layer: LayerAdapter, args, kwargs, output, device, inputs_finite,
                              row_dtype, sequences: int) -> None:
        """One input shared by the whole batch: its statistics once, then ``n_label`` times
        into each label's accumulators (every sample of the label used it), or ``sequences``
        times into the one group of an unlabelled forward of token ids."""
        once = _FreshDeltas(self, device)
        rows = layer.accumulate_(once, args, kwargs, output, None)
        for key, index in self.groups:
            deltas, samples = _SlotDeltas(self, key, device), sequences if index is None else index.numel()
            for own_name, delta in once.items():
                deltas[own_name].add_(delta, alpha=samples)
            self._count(key, {name: count * samples for name, count in rows.items()}, inputs_finite, row_dtype)

    def _count(self, key, rows: dict[str, int], inputs_finite, row_dtype) -> None:
        for own_name, count in rows.items():
            slot = self.protection.slot(own_name).name
            self.pending[(key, slot)][1] += count
            self.inputs_finite.setdefault(slot, []).append(inputs_finite)
            if row_dtype is not None:
                self.row_dtypes.setdefault(slot, set()).add(row_dtype)

    def _index(self, position: int, index: torch.Tensor, device: torch.device, windows: int = 1) -> torch.Tensor:
        """Group ``position``'s batch entries on ``device``; with ``windows`` entries per sample,
        the ``windows`` consecutive ones of each of its samples."""
        cached = self._indices_on.get((position, device, windows))
        if cached is None:
            cached = self._indices_on[(position, device, windows)] = window_entries(index, windows).to(device)
        return cached

    def _token_mask(self, position: int, index: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The real tokens of group ``position``'s sequences (all sequences without labels)."""
        cached = self._token_masks_on.get((position, device))
        if cached is None:
            mask = self.token_mask.to(device)
            if index is not None:
                chosen = torch.zeros(mask.shape[0], dtype=torch.bool, device=device)
                chosen[index.to(device)] = True
                mask = mask & chosen[:, None]
            cached = self._token_masks_on[(position, device)] = mask
        return cached

    # commit -------------------------------------------------------------------
    def commit(self) -> None:
        """Check every pending delta, then add them all to the store (this thread's forwards only)."""
        if not self.records():
            return
        pending, self.pending = self.pending, {}
        inputs_finite, self.inputs_finite = self.inputs_finite, {}
        broadcast, self.broadcast_layers = self.broadcast_layers, []
        windowed, self.windowed_layers = self.windowed_layers, []
        labelled, self.saw_labelled_batch = self.saw_labelled_batch, False
        row_dtypes, self.row_dtypes = self.row_dtypes, {}
        self.token_mask = None
        self._token_masks_on.clear()
        if broadcast and not labelled:  # every layer saw one sample: the labels are not this batch's
            raise ValueError(_mismatch(broadcast[0], self.batch_size, 1) + "; nothing from this batch was kept")
        if windowed and not labelled:  # no layer saw the n samples: too few labels, not windows
            raise ValueError(_mismatch(windowed[0][0], self.batch_size, windowed[0][1]) + "; nothing from this batch "
                             "was kept")
        for name, batch in windowed:  # layers inside a forward whose batch is the labels': windows of each sample
            warn_windows(name, batch, self.batch_size)
        if not pending:
            return
        # a NaN/Inf anywhere in the inputs shows up on the diagonal of x^T x
        finite = _finite_flags([coordinate_energies(delta) for delta, _ in pending.values()])
        for (key, name), ok in zip(pending, finite):
            if not ok:
                raise ValueError(_non_finite_message(key, name, pending[(key, name)][0], inputs_finite.get(name, [])))
        for (key, name), (delta, rows) in pending.items():
            self.store.add(key, name, delta, rows)
        for name, dtypes in row_dtypes.items():
            for dtype in dtypes:
                self.store.note_row_dtype(name, dtype)


def windows_per_sample(batch: int, labels: int | None) -> int:
    """``k`` where a layer's batch is ``k > 1`` whole multiples of the labels (window attention), else 1."""
    if labels is None or labels <= 0 or batch <= labels or batch % labels:
        return 1
    return batch // labels


def window_entries(index: torch.Tensor, windows: int) -> torch.Tensor:
    """The batch entries of samples ``index`` where each sample has ``windows`` consecutive ones."""
    if windows == 1:
        return index
    return (index[:, None] * windows + torch.arange(windows, device=index.device)).flatten()


def warn_windows(layer: str, batch: int, labels: int) -> None:
    warnings.warn(f"layer {layer!r}: its batch of {batch} is {batch // labels} x the {labels} labels; read as "
                  f"{batch // labels} consecutive entries per sample (window attention's layout)", UserWarning,
                  stacklevel=3)


def _mismatch(layer: str, labels: int, batch: int) -> str:
    return (
        f"layer {layer!r}: labels has {labels} entries but the layer's input has batch size {batch}; "
        "labels need one entry per sample along the batch dimension"
    )


def _inputs_finite(args, kwargs) -> torch.Tensor | None:
    """Whether the floating-point tensors a layer received are all finite (a 0-d bool tensor,
    not synchronised), or None when it received none (embedding indices cannot be NaN)."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        return None
    flags = [_finite_flag(t) for t in tensors]
    return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()


def _coarsest_dtype(args, kwargs) -> torch.dtype | None:
    """The floating dtype with the largest epsilon among a layer's tensor inputs (None when
    it received none: embedding indices are exact)."""
    dtypes = {t.dtype for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps, default=None)


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


class _FreshDeltas(dict):
    """Zero accumulators by an adapter's own slot names, outside the pending ones: a broadcast
    input's statistics, computed once before they are added to every label."""

    def __init__(self, observation: Observation, device: torch.device) -> None:
        super().__init__()
        self.observation, self.device = observation, device

    def __missing__(self, own_name: str) -> torch.Tensor:
        slot = self.observation.protection.slot(own_name)
        self[own_name] = slot.zeros(self.observation.store.dtype, self.device)
        return self[own_name]


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
