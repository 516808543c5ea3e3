"""Per-label statistics for a per-class criterion, whatever the storage policy, and the fold
from per-label storage into one total when the labels outgrow the budget.

The guarantee ``class_statistics`` gives, per kept label ``c`` and slot: ``trace`` is the
exact ``tr(C_c)`` (float64) of the rows observed under ``c`` (less its per-label forget
pass), and ``gram`` a float64 PSD matrix with ``gram <= C_c`` (Loewner order):

* per-label storage: ``gram = C_c`` exactly (``exact=True``);
* a class sketch (one total kept, or a sketched slot): ``gram = B_c^T B_c`` from a Frequent
  Directions sketch (``unsc_fast.statistics.sketch``), so ``tr(U^T gram U) <= tr(U^T C_c U)`` for every
  basis ``U``: a conservative lower bound of the energy of ``c`` that ``U`` captures,
  ``captured(U)`` without forming ``d x d``. ``sketched_energy`` says how much of ``tr(C_c)``
  the sketch holds at all (what it can certify, at most).

Where neither exists (a total without class sketches: the budget could not hold them) it
raises ``LookupError`` naming the slot and the label; so does a label whose rows a labelled
forget pass touched under one total (a sketch cannot be reduced by them).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Hashable, Iterator

import torch

from unsc_fast.statistics import sketch as fd
from unsc_fast.statistics import policies
from unsc_fast.statistics.store import CovarianceStore


@dataclass
class ClassStatistic:
    """One label's statistics for one slot; unpacks as ``(key, trace, gram)``. Grouped slots
    carry one per group: ``trace`` (g,) and ``gram`` (g, d, d)."""

    key: Hashable
    slot: str
    trace: float | torch.Tensor
    exact: bool
    matrix: torch.Tensor | None = None  # exact C_c (float64)
    rows: list[torch.Tensor] | None = None  # B_c per group, gram = B^T B

    @property
    def gram(self) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix
        grams = [b.double().T @ b.double() for b in self.rows]
        return grams[0] if len(grams) == 1 else torch.stack(grams)

    @property
    def sketched_energy(self) -> float | torch.Tensor:
        """``tr(gram) / tr(C_c)``: 1 when exact, the share a sketch holds otherwise."""
        held = torch.stack([b.double().square().sum() for b in self.rows]) if self.rows is not None else (
            self.matrix.diagonal(dim1=-2, dim2=-1).sum(-1))
        trace = torch.as_tensor(self.trace, dtype=torch.float64)
        ratio = torch.where(trace > 0, held.cpu() / trace, torch.ones_like(trace))
        return float(ratio) if ratio.numel() == 1 else ratio

    def captured(self, basis: torch.Tensor) -> float | torch.Tensor:
        """``tr(U^T gram U)`` (per group for a grouped slot), at most ``tr(U^T C_c U)``."""
        if self.rows is not None:
            bases = [basis] if basis.dim() == 2 else list(basis.unbind(0))
            values = torch.stack([(b.double() @ u.double().to(b.device)).square().sum() for b, u in zip(self.rows, bases)])
        else:
            u = basis.double().to(self.matrix.device)
            values = (u.mT @ self.matrix @ u).diagonal(dim1=-2, dim2=-1).sum(-1).reshape(-1)
        return float(values[0]) if values.numel() == 1 else values

    def __iter__(self):
        return iter((self.key, self.trace, self.gram))


def _from_sketch(key, slot: str, sketch: fd.SlotSketch) -> ClassStatistic:
    traces = [part.trace for part in sketch.parts]
    trace = traces[0] if len(traces) == 1 else torch.tensor(traces, dtype=torch.float64)
    return ClassStatistic(key, slot, trace, False, rows=[part.matrix() for part in sketch.parts])


def _exact(store: CovarianceStore, key, slot: str) -> ClassStatistic | None:
    matrix = store.matrix(key, slot)
    if matrix is None:
        return None
    matrix = matrix.to(torch.float64, copy=True)
    forget = store.matrix((policies.FORGET_KEY, key), slot)
    if forget is not None:  # a per-label forget pass: the label's remaining rows
        matrix -= forget.to(matrix.device, torch.float64)
    trace = matrix.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ClassStatistic(key, slot, float(trace) if trace.dim() == 0 else trace, True, matrix=matrix)


def statistics_of(projector, slot, key) -> ClassStatistic:
    """One label's statistics for ``slot`` (see the module docstring), or ``LookupError``."""
    name = slot.name
    if name in projector._sketch_slots:
        if name in projector._sketches.get((policies.FORGET_KEY, key), {}):
            raise LookupError(f"slot {name!r} is sketched and label {key!r} has rows in a forget pass: a sketch "
                              "cannot be reduced by them (call reset_forget() or serve the request class-wise)")
        found = projector._sketches.get(key, {}).get(name)
        if found is not None:
            return _from_sketch(key, name, found)
    elif projector.statistics == "per_label":
        found = _exact(projector.store, key, name)
        if found is not None:
            return found
    else:
        if key in projector._forget_labels:
            raise LookupError(f"slot {name!r}: label {key!r} has rows in the forget pass, and its class sketch "
                              "cannot be reduced by them (a sample-wise request); call reset_forget() first")
        found = projector._class_sketches.get(key, {}).get(name)
        if found is not None:
            return _from_sketch(key, name, found)
    raise LookupError(f"slot {name!r}: label {key!r} has no statistics (observed labels: {projector.class_keys})")


def class_statistics(projector, slot_name: str, keys=None) -> Iterator[ClassStatistic]:
    """Checks the slot and the policy now, then yields one label at a time."""
    slot = projector._slot(slot_name)
    if slot.kind == "diagonal":
        raise ValueError(f"slot {slot.name!r} is diagonal (an embedding): its basis keeps every token any kept "
                         "sample used, so every label's energy there is kept whole")
    if projector.statistics == "total" and slot.name not in projector._sketch_slots and not projector._class_sketches:
        raise LookupError(
            f"slot {slot.name!r}: no per-label statistics: one total is kept without class sketches (the memory "
            "budget could not hold them, or class_rows=0); a per-class criterion falls back to the total's")
    return (statistics_of(projector, slot, key) for key in (projector.class_keys if keys is None else keys))


def fold_to_total(projector, dtype: torch.dtype, class_rows: int, reason: str) -> None:
    """Per-label storage -> one total (and one forget pass), slot by slot, each label's matrix
    turned into its class sketch (``sketch.from_covariance``: ``B^T B <= C_c``, exact trace)
    before it is freed: the memory grows by one slot's total at a time, never a second store."""
    old, new = projector.store, CovarianceStore(dtype)
    coarsest = max(torch.finfo(old.dtype).eps, old.rounding or 0.0)
    new.rounding = coarsest if old.keys and coarsest > torch.finfo(dtype).eps else None
    labels = [k for k in old.keys if not policies.is_forget_key(k)]
    generator = torch.Generator().manual_seed(0)
    for name, slot in projector.protection.slots.items():
        for key in old.keys:
            matrix, rows = old.pop(key, name)
            if matrix is None:
                continue
            target = policies.FORGET_KEY if policies.is_forget_key(key) else policies.TOTAL_KEY
            if class_rows and target == policies.TOTAL_KEY and slot.kind != "diagonal":
                parts = [fd.from_covariance(m, class_rows, rows, generator=generator)
                         for m in (matrix.unbind(0) if slot.kind == "grouped" else [matrix])]
                projector._class_sketches.setdefault(key, {})[name] = fd.SlotSketch.of(parts)
            # may keep (and later add into) the matrix itself; a forget pass stays factored where it was
            new.add(target, name, matrix.to(dtype), rows, factor=target == policies.FORGET_KEY)
            del matrix
    for key in old.keys:
        if policies.is_forget_key(key) and policies.forget_label(key) is not None:
            projector._forget_labels.add(policies.forget_label(key))
    projector.store, projector.statistics = new, "total"
    size = f"{new.nbytes():,} bytes" if labels else \
        f"about {projector.memory_estimate(1, dtype=dtype).total('total'):,} bytes with a forget pass and the build"
    warnings.warn(
        f'statistics="auto": {reason}; ' + (f"folded the per-label statistics of {len(labels)} label(s) into"
                                                 if labels else "switched to") + " one total "
        f"({str(dtype).removeprefix('torch.')}, {size})"
        + (f" and class sketches of {class_rows} rows" if class_rows else ", without class sketches (the budget "
           "cannot hold them: a per-class criterion falls back to the total's)")
        + ". From now on a request costs one pass over its forget data: collect(forget_loader, forget=True), "
          "then build(exclude=...)", UserWarning, stacklevel=6)
