"""Storage policies for the observed statistics: per label, or one total less a forget pass.

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
    ``build_extra``: the one running sum a build holds for its largest layer.
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
        return max(self.sizes.values(), default=0) * self.itemsizes[policy]

    def as_dict(self) -> dict:
        return {p: {"total": self.total(p), "layers": self.per_layer(p)} for p in ("per_label", "total")}

    def __str__(self) -> str:
        header = f"{'layer':<32}{'numbers':>12}{'per_label':>16}{'total':>16}"
        lines = [f"statistics memory for {self.labels} labels (bytes)", header]
        per_label, total = self.per_layer("per_label"), self.per_layer("total")
        for name, size in self.sizes.items():
            lines.append(f"{name:<32}{size:>12,}{per_label[name]:>16,}{total[name]:>16,}")
        lines.append(f"{'all (+ one build sum)':<44}{self.total('per_label'):>16,}{self.total('total'):>16,}")
        return "\n".join(lines)


def estimate(sizes: dict[str, int], labels: int, dtype: torch.dtype | None) -> MemoryEstimate:
    """``sizes``: numbers per statistics slot (``d * d`` for a dense layer input)."""
    itemsizes = {p: _itemsize(dtype or default_dtype(p)) for p in ("per_label", "total")}
    return MemoryEstimate(int(labels), dict(sizes), itemsizes)


def over_budget(per_layer: dict[str, int], budget: int) -> str | None:
    """A message naming the widest-costing layer when ``per_layer`` does not fit ``budget``."""
    needed = sum(per_layer.values())
    if needed <= budget:
        return None
    name = max(per_layer, key=per_layer.get)
    return (
        f"needs {needed:,} bytes over a budget of {budget:,}; the largest layer {name!r} alone "
        f"takes {per_layer[name]:,} bytes"
    )


def choose(policy: str, sizes: dict[str, int], labels: int, dtype: torch.dtype | None, budget: int | None) -> str:
    """Resolve ``"auto"`` (per-label when it fits the budget, else total) and check the fit."""
    if policy not in POLICIES:
        raise ValueError(f"statistics must be one of {POLICIES}, got {policy!r}")
    if budget is None:
        if policy == "auto":
            raise ValueError('statistics="auto" needs memory_budget= (bytes) to choose against')
        return policy
    plan = estimate(sizes, labels, dtype)
    candidates = ("per_label", "total") if policy == "auto" else (policy,)
    reasons = []
    for candidate in candidates:
        problem = over_budget(plan.per_layer(candidate), budget)
        if problem is None:
            return candidate
        reasons.append(f'statistics="{candidate}" for {labels} labels {problem}')
    raise MemoryError("; ".join(reasons) + " (raise memory_budget, observe fewer layers with modules=[...], "
                      "or use a smaller dtype)")


class StatisticsRouter:
    """Files each committed delta under its policy's key and enforces the memory budget.

    The observation hooks call ``add(key, name, delta, rows)`` and read ``dtype``; the router
    forwards to the ``CovarianceStore`` after mapping the key: a forget pass goes under
    ``FORGET_KEY`` (total policy) or ``(FORGET_KEY, label)`` (per-label policy).
    """

    def __init__(self, store, *, forget: bool, budget: int | None) -> None:
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
        if self.budget is not None and self.store.matrix(key, name) is None:
            needed = self.store.nbytes() + delta.numel() * delta.element_size()
            if needed > self.budget:
                raise MemoryError(
                    f"layer {name!r}: a new {tuple(delta.shape)} {delta.dtype} matrix for key {key!r} "
                    f"({delta.numel() * delta.element_size():,} bytes) takes the statistics to "
                    f"{needed:,} bytes, over memory_budget={self.budget:,} (use statistics='total')"
                )
        self.store.add(key, name, delta, rows)

    def note_row_dtype(self, name: str, dtype: torch.dtype) -> None:
        self.store.note_row_dtype(name, dtype)


def sketched_layers(sketch, layers: dict, protection, labels: int, dtype, policy: str,
                    budget: int | None) -> dict[str, int]:
    """``{layer name: sketch rows}``: the user's choice, else (``statistics="auto"`` under a
    budget) every Linear layer whose dense statistics alone would take over half of ``budget``
    under the cheapest policy (so that "auto" prefers a dense total to a sketch). Only a plain ``nn.Linear``
    with its own slot can be sketched (the sketch hooks read its input rows directly)."""
    from torch import nn

    from unsc_fast.statistics.sketch import DEFAULT_ROWS

    def sketchable(name: str) -> bool:
        layer = layers[name]
        own = protection.slot(layer.slot_name())
        shared = sum(1 for other in layers.values() if protection.slot(other.slot_name()).name == own.name) > 1
        return type(layer.module) is nn.Linear and own.kind == "dense" and not shared

    if sketch is not None:
        unknown = sorted(set(sketch) - set(layers))
        if unknown:
            raise KeyError(f"sketch names untracked layers {unknown}; tracked: {list(layers)}")
        wrong = sorted(n for n in sketch if not sketchable(n))
        if wrong:
            raise ValueError(f"sketches support Linear layers only (with their own statistics), not {wrong}")
        return {name: int(rows) for name, rows in sketch.items()}
    if budget is None or policy != "auto":  # an explicit policy is kept, or refused
        return {}
    sizes = {name: layer.module.in_features**2 for name, layer in layers.items() if sketchable(name)}
    plan = estimate(sizes, labels, dtype)
    return {name: DEFAULT_ROWS for name in sizes if min(plan.per_layer(p)[name] for p in ("per_label", "total")) > budget / 2}
