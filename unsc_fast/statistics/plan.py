"""Which statistics a projector keeps, chosen before the first batch from a memory budget.

The cost of each policy is its **peak** (the statistics at rest plus what observing and
building add), estimated per slot from its width, not measured:

* ``per_label``: ``L + 1`` sets of matrices (one per label, one forget pass) plus the larger
  of one pending set (a batch's delta for a label already stored) and the build's solve;
* ``total``: 2 sets (the total and one forget pass) plus the larger of a pending set and the
  solve;
* the solve: slots solved widest first, each its kept sum plus a dense fp64
  eigendecomposition (``SOLVE_MATRICES`` fp64 ``d x d`` matrices: the input, which LAPACK
  overwrites with the eigenvectors, and its workspace, measured at 2.27 ``d^2`` doubles with
  MKL's ``dsyevd``; ``ops.dense.lean_eigh``) and the basis copied out of it, beside the bases of the slots before
  it (a basis and its complement, up to ``d x d`` each);
* slot sketches: ``keys x capacity x d`` fp64 per sketched slot, twice (a forward or a
  build holds a second copy); class sketches: ``labels x l x d`` fp32 per dense slot, twice.

``plan`` walks the ladder of ``statistics="auto"``: sketch the layers whose ``d x d`` does not
fit (one float32 total of that layer alone exceeds the budget); then per-label
storage if ``L`` labels fit, else one total (float64 if it fits, else float32), with class
sketches of as many rows as the room left holds (``CLASS_ROWS_MAX`` at most; none below
``CLASS_ROWS_MIN``). An explicit policy is only checked: it is refused before anything is
allocated when it cannot fit, with the layer, the bytes, the budget and the options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from unsc_fast.statistics.sketch import DEFAULT_ROWS

SOLVE_MATRICES = 3.5
CLASS_ROWS_MAX = 32
CLASS_ROWS_MIN = 4
SKETCH_ROWS_MIN = 8
F32, F64 = 4, 8


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class SlotCost:
    """What one slot's statistics cost: ``numel`` numbers per dense set, ``width`` = groups x d
    numbers per sketch row, ``dim`` for the solve."""

    name: str
    kind: str
    dim: int
    groups: int
    numel: int

    @property
    def width(self) -> int:
        return self.groups * self.dim

    def solve_bytes(self, size: int) -> int:
        """Its kept sum, the fp64 eigendecomposition, and the basis and complement copied out of
        it in ``size`` bytes while it is alive."""
        return 0 if self.kind == "diagonal" else 2 * self.numel * size + int(SOLVE_MATRICES * F64 * self.dim**2)


@dataclass
class Costs:
    """Peak bytes of each policy for a set of slots, some of them sketched (``rows`` per slot)."""

    slots: dict[str, SlotCost]
    sketched: dict[str, int] = field(default_factory=dict)

    def dense(self) -> list[SlotCost]:
        return [s for n, s in self.slots.items() if n not in self.sketched]

    def set_bytes(self, size: int) -> int:
        return sum(s.numel for s in self.dense()) * size

    def solve_bytes(self, size: int) -> int:
        """The build's peak beside the stored sets: slots solved widest first (``solve.local_bases``),
        each solve beside the bases kept before it (a basis and its complement: up to ``d x d``)."""
        held = peak = 0
        for slot in sorted((s for s in self.dense() if s.kind != "diagonal"), key=lambda s: -s.solve_bytes(size)):
            peak = max(peak, held + slot.solve_bytes(size))
            held += slot.numel * size
        return max(peak, held)

    def sketch_bytes(self, keys: int) -> int:
        return 2 * keys * sum(buffer_capacity(r) * self.slots[n].width * F64 for n, r in self.sketched.items())

    def class_row_bytes(self, labels: int) -> int:
        """Bytes per class-sketch row over every label (held twice at a peak)."""
        return 2 * labels * sum(s.width for s in self.dense() if s.kind != "diagonal") * F32

    def per_label(self, labels: int, size: int, pending: int = 1) -> int:
        sets = self.set_bytes(size)
        return (labels + 1) * sets + max(pending * sets, self.solve_bytes(size)) + self.sketch_bytes(labels + 1)

    def total(self, labels: int, size: int, class_rows: int = 0) -> int:
        sets = self.set_bytes(size)
        return (2 * sets + max(sets, self.solve_bytes(size)) + self.sketch_bytes(labels + 1)
                + class_rows * self.class_row_bytes(labels))

    def policy(self, policy: str, labels: int, size: int, class_rows: int = 0) -> int:
        return self.per_label(labels, size) if policy == "per_label" else self.total(labels, size, class_rows)


def buffer_capacity(rows: int) -> int:
    return 2 * rows


@dataclass
class Plan:
    """The resolved statistics: policy, accumulation dtype, sketched slots (rows each), rows of
    the class sketches (0: none), the budget chosen against and a one-line reason."""

    policy: str
    dtype: torch.dtype
    sketch_rows: dict[str, int]
    class_rows: int
    budget: int
    reason: str
    over_budget: bool = False  # the cheapest policy exceeds the budget, within the machine's memory


def slot_costs(slots: dict) -> dict[str, SlotCost]:
    return {name: SlotCost(name, s.kind, s.dim, s.groups, math.prod(s.shape)) for name, s in slots.items()}


def _refusal(policy: str, costs: Costs, labels: int, size: int, budget: int, what: str) -> MemoryError:
    widest = max(costs.dense(), key=lambda s: s.numel, default=None)
    layer = "" if widest is None else (
        f"; its widest layer {widest.name!r} (d={widest.dim}) alone takes {widest.numel * size:,} bytes per set")
    return MemoryError(
        f'statistics="{policy}" for {labels} label(s) needs about {costs.policy(policy, labels, size):,} bytes at '
        f"its peak, over {what} of {budget:,} bytes{layer}. Options: statistics=\"auto\" (one total and "
        "sketches where per-label storage does not fit), statistics=\"total\" (one pass over the forget data "
        "per request), sketch={layer: rows} for the widest layers, observe fewer layers with modules=[...], "
        "or a larger memory_budget="
    )


def check_explicit(policy: str, costs: Costs, labels: int, dtype: torch.dtype, limit: int, what: str) -> None:
    """Refuse an explicitly requested policy that cannot fit ``limit`` (before allocating)."""
    size = itemsize(dtype)
    if costs.policy(policy, labels, size) > limit:
        raise _refusal(policy, costs, labels, size, limit, what)


def worth_sketching(slot: SlotCost) -> bool:
    """A sketch of ``SKETCH_ROWS_MIN`` rows at most an eighth of the width (``max_rows``) is
    at least 2x smaller per key than the slot's float32 ``d x d`` (fp64, ``2 l`` rows: 16 l d
    bytes against 4 d^2)."""
    return max_rows(slot) >= SKETCH_ROWS_MIN


def max_rows(slot: SlotCost) -> int:
    return min(DEFAULT_ROWS, slot.dim // 8)


def auto_sketches(costs: Costs, units: dict[str, list[str]], labels: int, budget: int) -> dict[str, int]:
    """The layers whose ``d x d`` does not fit: those (``units``: layer -> its slots, the
    sketchable layers wide enough for a sketch to pay) whose float32 total alone, with its
    solve, exceeds ``budget``; rows as many as fit, at most ``max_rows``. A layer whose dense
    statistics fit keeps them even when all layers together exceed the budget (one total is
    then kept over it, within the machine, with a warning): a sketch of a few rows per label
    holds less of the energy than the threshold asks for."""
    units = {layer: slots for layer, slots in units.items() if all(worth_sketching(costs.slots[n]) for n in slots)}
    alone = {layer: Costs({n: costs.slots[n] for n in slots}).total(labels, F32) for layer, slots in units.items()}
    chosen = {slot: 0 for layer, slots in units.items() if alone[layer] > budget for slot in slots
              if slot not in costs.sketched}
    if chosen:
        dense_only = Costs(costs.slots, {**costs.sketched, **{n: 0 for n in chosen}}).total(labels, F32)
        per_row = Costs(costs.slots, {n: 1 for n in chosen}).sketch_bytes(labels + 1)
        rows = min(min(max_rows(costs.slots[n]) for n in chosen), max(0, budget - dense_only) // max(1, per_row))
        if rows < SKETCH_ROWS_MIN:  # sketches too small to hold anything: dense, judged against the machine
            return {}
        chosen = {n: int(rows) for n in chosen}
    return chosen


def class_rows_for(costs: Costs, labels: int, size: int, budget: int) -> int:
    """Rows of each class sketch that the budget leaves room for beside one total (0: none)."""
    room = budget - costs.total(labels, size)
    rows = min(CLASS_ROWS_MAX, max(0, room) // max(1, costs.class_row_bytes(max(1, labels))))
    return int(rows) if rows >= CLASS_ROWS_MIN else 0


def plan(requested: str, slots: dict, units: dict[str, list[str]], user_sketch: dict[str, int], labels: int | None,
         dtype: torch.dtype | None, budget: int, limit: int, limit_source: str, class_rows: int | None) -> Plan:
    """Resolve ``requested`` ("auto", "per_label" or "total") for ``labels`` labels (None:
    unknown, planned for one and folded later) against ``budget`` bytes. Explicit policies
    are refused only past ``limit`` (``limit_source`` names it in the message)."""
    count = max(1, labels or 1)
    costs = Costs(slot_costs(slots), dict(user_sketch))
    if requested == "per_label":
        check_explicit("per_label", costs, count, dtype or torch.float32, limit, limit_source)
        return Plan("per_label", dtype or torch.float32, costs.sketched, class_rows or 0, budget, "requested")
    if requested == "total":
        chosen = dtype or torch.float64
        check_explicit("total", costs, count, chosen, limit, limit_source)
        rows = class_rows if class_rows is not None else class_rows_for(costs, count, itemsize(chosen), budget)
        return Plan("total", chosen, costs.sketched, rows, budget, "requested")
    costs.sketched.update(auto_sketches(costs, units, count, budget))
    if costs.per_label(count, itemsize(dtype or torch.float32)) <= budget:
        return Plan("per_label", dtype or torch.float32, costs.sketched, class_rows or 0, budget,
                    f"{count} label(s) fit per label")  # class_rows: for the class sketches of a later fold
    candidates = [dtype] if dtype is not None else [torch.float64, torch.float32]
    chosen = next((c for c in candidates if costs.total(count, itemsize(c)) <= budget), candidates[-1])
    reason = f"{count} label(s) do not fit per label ({costs.per_label(count, F32):,} bytes)"
    over = costs.total(count, itemsize(chosen)) > budget
    if over:
        check_explicit("total", costs, count, chosen, limit, limit_source)  # over the budget, within the machine
        reason += f"; one total ({costs.total(count, itemsize(chosen)):,} bytes) exceeds the budget but fits the {limit_source}"
    rows = class_rows if class_rows is not None else class_rows_for(costs, count, itemsize(chosen), budget)
    return Plan("total", chosen, costs.sketched, rows, budget, reason, over)
