"""Frequent Directions: a streaming ``l x d`` sketch for layers too wide for a ``d x d`` matrix.

Why: a 25,088-wide classifier input costs 2.5 GB per fp32 covariance (5 GB in fp64); an
LLM's MLP input 0.5-0.8 GB per layer and group. Frequent Directions (Liberty 2013; Ghashami,
Liberty, Phillips, Woodruff 2016) keeps ``B`` with at most ``2 l`` rows such that, for the
rows ``A`` seen so far,

    0 <= A^T A - B^T B   and   ||A^T A - B^T B||_2 <= shrunk <= ||A||_F^2 / l

where ``shrunk`` is the sum of the shrink amounts, tracked exactly (the bound used here; each
shrink removes at least ``l * delta`` of ``||B||_F^2``, so their sum is at most
``||A||_F^2 / l``). Memory: ``2 l d`` numbers per layer and key, whatever the row count.

Energy guarantee. Because ``B^T B <= A^T A`` (Loewner order), any basis ``U`` captures at
least as much of A's energy as of B's: ``tr(U^T A^T A U) >= tr(U^T B^T B U)``. ``basis``
therefore takes the smallest ``k`` top right singular vectors of ``B`` whose energy reaches
``threshold * ||A||_F^2`` (the exact trace, accumulated in fp64): the basis keeps at least
the threshold of the *true* energy. When the sketch holds too little energy for that (too
few rows ``l`` for a flat spectrum) it keeps every direction of ``B`` and warns with the
energy it can promise.

Limits: a sketch cannot be subtracted from (no total-minus-forget); requests on sketched
layers sum the kept keys' sketches (class-wise requests, named groups). Linear layers only.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from unsc_fast.adapters.tokens import TokenMask, padding_mask

DEFAULT_ROWS = 256


class FrequentDirections:
    """The sketch of one layer under one key: ``rows`` (<= 2 l, d), the exact trace and ``shrunk``."""

    def __init__(self, dim: int, rows: int = DEFAULT_ROWS, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None) -> None:
        if rows < 1:
            raise ValueError(f"a sketch needs at least one row, got {rows}")
        self.dim, self.l = dim, int(rows)
        self.buffer = torch.zeros(2 * self.l, dim, dtype=dtype, device=device)
        self.filled = 0
        self.trace = 0.0  # ||A||_F^2, fp64 on the host
        self.shrunk = 0.0  # sum of the shrink amounts: the spectral error bound
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows ``(n, d)`` of ``A``; ``rows`` may be bf16/fp16 (sketched in ``dtype``)."""
        rows = rows.reshape(-1, self.dim)
        self.trace += float(rows.double().square().sum())
        self.count += rows.shape[0]
        start = 0
        while start < rows.shape[0]:
            if self.filled == self.buffer.shape[0]:
                self._shrink()
            take = min(rows.shape[0] - start, self.buffer.shape[0] - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[start : start + take].to(self.buffer.dtype)
            self.filled += take
            start += take

    def _shrink(self) -> None:
        """SVD of the full buffer; subtract the l-th largest squared singular value from all of
        them (rows l..2l become zero, leaving room for l new rows)."""
        _, s, vh = torch.linalg.svd(self.buffer[: self.filled], full_matrices=False)
        delta = float(s[self.l - 1] ** 2) if s.numel() >= self.l else 0.0
        shrunk = (s.square() - delta).clamp_min(0).sqrt()
        keep = int((shrunk > 0).sum())
        self.buffer.zero_()
        self.buffer[:keep] = shrunk[:keep, None] * vh[:keep]
        self.filled = keep
        self.shrunk += delta

    def matrix(self) -> torch.Tensor:
        """``B``: the sketch rows in use (a view)."""
        return self.buffer[: self.filled]

    def state(self) -> dict:
        """Tensors and plain values that ``restore`` turns back into this sketch, bit for bit
        (the rows past ``filled`` are always zero)."""
        return {"matrix": self.matrix().clone(), "sketch_rows": self.l, "trace": self.trace,
                "shrunk": self.shrunk, "count": self.count}

    @classmethod
    def restore(cls, matrix: torch.Tensor, sketch_rows: int, trace: float, shrunk: float, count: int,
                device: torch.device | None = None) -> "FrequentDirections":
        """The sketch that ``state`` described (its fields checked by ``unsc_fast.projector.sketch_state``)."""
        sketch = cls(matrix.shape[1], sketch_rows, matrix.dtype, device)
        sketch.buffer[: matrix.shape[0]] = matrix.to(sketch.buffer.device)
        sketch.filled, sketch.trace, sketch.shrunk, sketch.count = matrix.shape[0], trace, shrunk, count
        return sketch


def basis(sketches: list[FrequentDirections], threshold: float, name: str = "") -> torch.Tensor:
    """``(d, k)`` orthonormal basis keeping at least ``threshold`` of the true energy of the rows
    summed over ``sketches`` (see the module docstring for why this is a guarantee)."""
    stacked = torch.cat([s.matrix() for s in sketches]).double()
    trace = sum(s.trace for s in sketches)
    dim = sketches[0].dim
    if stacked.shape[0] == 0 or trace == 0.0:
        return torch.zeros(dim, 0, dtype=sketches[0].buffer.dtype, device=stacked.device)
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    energy = s.square().cumsum(0)
    reached = (energy >= threshold * trace).nonzero()
    if reached.numel():
        k = int(reached[0]) + 1
    else:
        k = int((s > 0).sum())
        warnings.warn(
            f"layer {name!r}: its sketch holds {float(energy[-1]) / trace:.4f} of the energy, below the "
            f"threshold {threshold}; keeping all {k} sketched directions (raise the sketch rows)",
            UserWarning, stacklevel=3,
        )
    return vh[:k].T.contiguous().to(sketches[0].buffer.dtype)


@dataclass
class SketchTarget:
    """One sketched statistics slot: its name, the Linear whose inputs feed it, the sketch rows."""

    name: str
    module: nn.Linear
    rows: int

    @property
    def dim(self) -> int:
        return self.module.in_features


class SketchObservation:
    """Forward hooks that feed the sketched layers' input rows into per-key sketches.

    Rows are buffered per forward and committed when the root forward returns, after a
    finiteness check (all or nothing, like ``observation.Observation``).
    """

    def __init__(self, sketches: dict, targets: list[SketchTarget], groups: list, dtype: torch.dtype,
                 batch_size: int | None = None) -> None:
        """``groups``: ``[(key, sample_indices or None)]``, as ``observation._label_groups`` makes;
        ``batch_size``: the number of labels, which every sketched input must match."""
        self.sketches, self.layers, self.groups, self.dtype = sketches, list(targets), groups, dtype
        self.batch_size = batch_size
        self.thread = threading.get_ident()  # only this thread's forwards are recorded
        self.rows = {target.name: target.rows for target in self.layers}
        self.pending: list[tuple] = []
        self.handles: list = []
        self.calls = 0  # sketched layer forwards seen
        self.token_mask: torch.Tensor | None = None  # the forward's real tokens (``adapters.tokens``)

    def attach(self, root) -> None:
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_hook(
                lambda module, args, output, layer=layer: self._record(layer, args[0])))
        self.handles.append(root.register_forward_pre_hook(self._begin, with_kwargs=True))
        self.handles.append(root.register_forward_hook(lambda *_: self.commit()))

    def _records(self) -> bool:
        return threading.get_ident() == self.thread

    def _begin(self, module, args, kwargs) -> None:
        """A new forward of the root (this thread's only): clean buffers, and its padding mask."""
        if self._records():
            self.pending.clear()
            self.token_mask = padding_mask(kwargs)

    def _record(self, layer: SketchTarget, x) -> None:
        if not self._records():
            return
        self.calls += 1
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1] != layer.dim:
            raise ValueError(f"layer {layer.name!r}: expected a floating-point input ending in {layer.dim}")
        batch = 1 if x.dim() == 1 else x.shape[0]
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(
                f"layer {layer.name!r}: labels has {self.batch_size} entries but the layer's input "
                f"has batch size {batch}; labels need one entry per sample along the batch dimension"
            )
        x = x.detach()
        for key, index in self.groups:
            if self.token_mask is not None:  # real tokens only, of this group's sequences
                mask = self.token_mask.to(x.device)
                if index is not None:
                    mask = mask & torch.isin(torch.arange(mask.shape[0], device=x.device), index.to(x.device))[:, None]
                part = TokenMask(mask, layer.name).rows(x)
            else:
                part = x if index is None else x.index_select(0, index.to(x.device))
            self.pending.append((key, layer.name, part.reshape(-1, layer.dim)))

    def commit(self) -> None:
        if not self._records():
            return
        pending, self.pending = self.pending, []
        for _, name, rows in pending:
            if not bool(torch.isfinite(rows).all()):
                raise ValueError(f"layer {name!r}: the observed batch has NaN or Inf inputs; nothing was kept")
        for key, name, rows in pending:
            per_key = self.sketches.setdefault(key, {})
            if name not in per_key:
                per_key[name] = FrequentDirections(rows.shape[1], self.rows[name], self.dtype, rows.device)
            per_key[name].update(rows)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.pending.clear()
