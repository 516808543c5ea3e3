"""Storage policies for the observed statistics: per label, or one total less a forget pass
(``statistics_plan`` chooses between them from the memory budget).

Why: per-label covariances cost ``sum_l d_l^2`` per label (369 MB per label on a CIFAR
ResNet-18, 2.5 GB per label on VGG-11's 25,088-wide classifier input), so they do not scale
with the number of classes. Every deletion request must touch its forget data anyway, so
one pass over it is enough to derive the remaining data's covariance as

    C_remain = C_total - C_forget

whatever the number of classes and whether the request is class-wise or sample-wise. The
subtraction cancels catastrophically in fp32 when the forget data is a large share of the
total (a 90 % share leaves the result with ~10x the relative error of the operands), so the
"total" policy accumulates in float64 unless told otherwise.

``StatisticsRouter`` is what the observation hooks see as their "store": it only decides
under which key a committed delta is filed (the hook itself is unchanged) and refuses a new
matrix that would break the memory budget, naming the layer and the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from unsc_fast.statistics.plan import SOLVE_MATRICES

POLICIES = ("per_label", "total", "auto")
TOTAL_KEY = "total"
FORGET_KEY = "forget"  # per-label forget passes are filed under (FORGET_KEY, label)


def is_forget_key(key) -> bool:
    return key == FORGET_KEY or (isinstance(key, tuple) and len(key) == 2 and key[0] == FORGET_KEY)


def forget_label(key):
    """The remaining-data key a forget key's rows also sit in (None for the unlabelled pass)."""
    return key[1] if isinstance(key, tuple) else None


def default_dtype(policy: str) -> torch.dtype:
    """float64 where the build subtracts a pass from a total (see the module docstring)."""
    return torch.float64 if policy == "total" else torch.float32


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class MemoryEstimate:
    """Bytes the statistics would take, per policy and per layer, before observing anything.

    ``per_label``: ``labels`` matrices per layer (plus one forget matrix per label a
    request touches, counted as one here); ``total``: the total and one forget pass.
    ``build_extra``: the larger of a batch's pending matrices and what a build holds: the
    layers solved widest first, each its kept sum and a dense fp64 eigendecomposition's
    ``SOLVE_MATRICES`` beside the bases before it (``statistics_plan`` prices the same way).
    """

    labels: int
    sizes: dict[str, int]  # numbers per statistics slot (d^2 for a dense layer input)
    itemsizes: dict[str, int]

    def per_layer(self, policy: str) -> dict[str, int]:
        copies = self.labels + 1 if policy == "per_label" else 2
        return {name: copies * size * self.itemsizes[policy] for name, size in self.sizes.items()}

    def total(self, policy: str) -> int:
        return sum(self.per_layer(policy).values()) + self.build_extra(policy)

    def build_extra(self, policy: str) -> int:
        size = self.itemsizes[policy]
        held = peak = 0
        for numbers in sorted(self.sizes.values(), reverse=True):  # widest first, as build solves them
            peak = max(peak, held + 2 * numbers * size + int(numbers * SOLVE_MATRICES * 8))
            held += numbers * size  # its basis and complement
        return max(sum(self.sizes.values()) * size, peak, held)

    def as_dict(self) -> dict:
        return {p: {"total": self.total(p), "layers": self.per_layer(p)} for p in ("per_label", "total")}

    def __str__(self) -> str:
        header = f"{'layer':<32}{'numbers':>12}{'per_label':>16}{'total':>16}"
        lines = [f"statistics memory for {self.labels} labels (bytes)", header]
        per_label, total = self.per_layer("per_label"), self.per_layer("total")
        for name, size in self.sizes.items():
            lines.append(f"{name:<32}{size:>12,}{per_label[name]:>16,}{total[name]:>16,}")
        lines.append(f"{'all (+ pending or build)':<44}{self.total('per_label'):>16,}{self.total('total'):>16,}")
        return "\n".join(lines)


def estimate(sizes: dict[str, int], labels: int, dtype: torch.dtype | None) -> MemoryEstimate:
    """``sizes``: numbers per statistics slot (``d * d`` for a dense layer input)."""
    itemsizes = {p: _itemsize(dtype or default_dtype(p)) for p in ("per_label", "total")}
    return MemoryEstimate(int(labels), dict(sizes), itemsizes)


class StatisticsRouter:
    """Files each committed delta under its policy's key.

    The observation hooks call ``add(key, name, delta, rows)`` and read ``dtype``; the router
    forwards to the ``CovarianceStore`` after mapping the key: a forget pass goes under
    ``FORGET_KEY`` (total policy) or ``(FORGET_KEY, label)`` (per-label policy). Whether a
    batch fits the memory budget is decided before it runs (``StatisticsMixin._make_room``);
    ``budget`` is a last guard that refuses a new matrix past it, naming the layer and bytes.
    """

    def __init__(self, store, *, forget: bool, budget: int | None = None) -> None:
        self.store, self.forget, self.budget = store, forget, budget

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    def key(self, key: Hashable) -> Hashable:
        if not self.forget:
            return key
        return FORGET_KEY if key in (TOTAL_KEY, FORGET_KEY) else (FORGET_KEY, key)

    def add(self, key: Hashable, name: str, delta: torch.Tensor, rows: int) -> None:
        key = self.key(key)
        if self.budget is not None and not self.store.has(key, name):
            needed = self.store.nbytes() + delta.numel() * delta.element_size()
            if needed > self.budget:
                raise MemoryError(
                    f"layer {name!r}: a new {tuple(delta.shape)} {delta.dtype} matrix for key {key!r} "
                    f"({delta.numel() * delta.element_size():,} bytes) takes the statistics to "
                    f"{needed:,} bytes, over memory_budget={self.budget:,} (use statistics='total')"
                )
        self.store.add(key, name, delta, rows, factor=self.forget)  # a forget pass: kept as a factor where its rows are few

    def note_row_dtype(self, name: str, dtype: torch.dtype) -> None:
        self.store.note_row_dtype(name, dtype)
