"""What a layer adapter is: which input rows a module's weights multiply, and how each weight
is seen as a matrix whose last dimension multiplies those rows.

A **slot** is one set of input statistics: ``dense`` (a ``d x d`` covariance), ``grouped``
(``g`` independent ``d x d`` covariances, e.g. a grouped convolution or attention's packed
q/k/v projections) or ``diagonal`` (one count per input coordinate: the one-hot inputs of an
embedding, whose covariance is diagonal). A **use** ties a parameter to a slot: ``view(t)``
turns a parameter-shaped tensor into the matrix (or batch of matrices) whose last dimension
multiplies the slot's rows, and ``side`` says which dimension of the stored parameter that
is (``"in"``: dims 1.., as ``nn.Linear``; ``"out"``: dim 0, as ``nn.Embedding`` or
transformers' ``Conv1D``). Two uses of one parameter on the same side share one slot (their
covariances add up); uses on opposite sides compose, since a left and a right projection
commute (UNSC on a tied embedding and output head is a two-sided projection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from unsc_fast import ops
from unsc_fast.adapters.tokens import TokenMask
from unsc_fast.ops.reference import symmetrize_

KINDS = ("dense", "grouped", "diagonal")
SIDES = ("in", "out")


@dataclass(frozen=True)
class Slot:
    """One set of input statistics, stored under ``name`` in the covariance store."""

    name: str
    dim: int
    kind: str = "dense"
    groups: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "diagonal":
            return (self.dim,)
        if self.kind == "grouped":
            return (self.groups, self.dim, self.dim)
        return (self.dim, self.dim)

    def zeros(self, dtype: torch.dtype, device) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=dtype, device=device)

    def solve(self, covariance: torch.Tensor, threshold: float, generator=None, method: str = "auto") -> torch.Tensor:
        """The protected subspace of this slot's inputs.

        dense: (d, k) orthonormal, the energy basis; grouped: (g, d, kmax), each group's
        basis padded with zero columns (a zero column projects nothing away); diagonal: a
        bool mask (d,) of the coordinates ever seen. An embedding row that any remaining
        sample used is protected whatever its count: the threshold does not apply there,
        since dropping a rare token's row would let its output move freely.
        """
        return self.solve_with_complement(covariance, threshold, generator, method)[0]

    def solve_with_complement(self, covariance: torch.Tensor, threshold: float, generator=None,
                              method: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(solve(...), Q)``: for a dense slot solved by eigh, Q (d, d - k) is the orthonormal
        complement of its basis (the other eigenvectors; ``solve.complement`` keeps it where it is the
        cheaper factor instead of computing one by QR); None otherwise."""
        if self.kind == "diagonal":
            return covariance > 0, None
        if self.kind == "grouped":
            for matrix in covariance.unbind(0):
                symmetrize_(matrix)
            bases = ops.energy_bases(list(covariance.unbind(0)), threshold, generator, method=method)
            width = max(b.shape[1] for b in bases)
            padded = covariance.new_zeros((self.groups, self.dim, width))
            for index, basis in enumerate(bases):
                padded[index, :, : basis.shape[1]] = basis
            return padded, None
        # The kept sum is the projector's own temporary: symmetrised in place, the solver then
        # makes no d x d copy of it (build peaks at the sum plus the solver's sketch).
        return ops.energy_bases_with_complements([symmetrize_(covariance)], threshold, generator, method=method)[0]

    def rank(self, basis: torch.Tensor) -> int | list[int]:
        """Kept dimensions: an int, or one per group."""
        if self.kind == "diagonal":
            return int(basis.sum())
        if self.kind == "grouped":
            return [int(b.abs().sum(0).gt(0).sum()) for b in basis.unbind(0)]
        return basis.shape[1]


@dataclass
class Use:
    """Parameter ``param`` (``name`` in the model) multiplies the rows of slot ``slot``."""

    param: nn.Parameter
    name: str
    slot: str
    side: str
    view: Callable[[torch.Tensor], torch.Tensor]


class LayerAdapter:
    """Base of every adapter: a tracked module, its slots, its uses, and the hook's work.

    Subclasses set ``kind`` and implement ``slots``, ``uses``, ``batch_size`` and
    ``accumulate_``. ``slot_name(local)`` gives a slot's store name: the module name for a
    layer's only slot, ``name#local`` otherwise.
    """

    kind = "layer"
    per_token = False  # rows are one per token of a (B, T, ...) input: attention_mask can select them

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    # what the projector asks once ------------------------------------------
    def slot_name(self, local: str = "") -> str:
        return self.name if not local else f"{self.name}#{local}"

    def slots(self) -> list[Slot]:
        raise NotImplementedError

    def uses(self) -> list[Use]:
        raise NotImplementedError

    @property
    def weight(self) -> nn.Parameter:
        """The layer's main parameter (where the projector reports devices and widths)."""
        return self.uses()[0].param

    @property
    def dim(self) -> int:
        return self.slots()[0].dim

    # what the hook does on every forward -------------------------------------
    def batch_size(self, args, kwargs) -> int:
        raise NotImplementedError

    def accumulate_(self, deltas: dict[str, torch.Tensor], args, kwargs, output, index) -> dict[str, int]:
        """Add this forward's rows (only the samples in ``index``, or all when None) to
        ``deltas`` (slot name -> accumulator of the slot's shape); return rows per slot.
        ``index`` is a ``TokenMask`` when the forward has an ``attention_mask`` (only for
        ``per_token`` adapters: ``select`` keeps the real tokens' rows)."""
        raise NotImplementedError

    def input_rows(self, args, kwargs, output, index) -> Iterator[tuple[str, int | None, torch.Tensor]]:
        """The rows whose covariance ``accumulate_`` adds, as ``(own slot name, group, rows (n, d))``
        chunks (group None for a dense slot): what a sketch consumes instead of a ``d x d``
        matrix. A diagonal slot (embedding counts) has no rows to sketch."""
        raise NotImplementedError(f"layer {self.name!r}: a {type(self).__name__} cannot feed a sketch")

    def detach(self) -> None:
        """Called when observation ends (adapters holding per-forward state clear it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {', '.join(f'{s.name}: {s.kind} d={s.dim}' for s in self.slots())})"


def first_input(args, kwargs, keyword: str = "input"):
    """The module's first input, passed positionally or by keyword (``lin(input=x)``)."""
    if args:
        return args[0]
    if keyword in kwargs:
        return kwargs[keyword]
    return next(iter(kwargs.values()), None)


def check_floating(name: str, x, what: str = "input") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = type(x).__name__ if not isinstance(x, torch.Tensor) else str(x.dtype)
        raise TypeError(f"layer {name!r}: expected a floating-point {what} tensor, got {got}")
    return x


def select(x: torch.Tensor, index, dim: int = 0) -> torch.Tensor:
    """The chosen samples of ``x`` along its batch dimension ``dim``: all (None), an index
    tensor, or a ``TokenMask`` (the real tokens' rows, flattened: see ``adapters.tokens``)."""
    if index is None:
        return x
    if isinstance(index, TokenMask):
        return index.rows(x, dim)
    return x.index_select(dim, index.to(x.device))


def trailing_dims_merge_as_view(tensor: torch.Tensor) -> bool:
    """Whether ``tensor.reshape(tensor.shape[0], -1)`` is a view (writes reach ``tensor``):
    each trailing stride must be the next one's stride times its size (size-1 dims aside),
    e.g. not for a channels_last conv gradient. Read from sizes and strides, not data
    pointers, so that torch.compile can trace it."""
    inner = None
    for size, stride in zip(reversed(tensor.shape[1:]), reversed(tensor.stride()[1:])):
        if size == 1:
            continue
        if inner is not None and stride != inner:
            return False
        inner = stride * size
    return True
