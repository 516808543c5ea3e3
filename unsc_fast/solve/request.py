"""Solving one request on this process: which keys it sums and subtracts, and a basis per slot.

The statistics policy decides the keys (per label: the kept labels, less ``subtract`` and the
forget passes inside them; total: the one total, less every forget pass). Each slot's kept
sum is solved on its own (one sum alive at a time, so a build peaks at one extra matrix per
slot); sketched layers take their basis from the Frequent Directions sketch instead.
"""
from __future__ import annotations

import torch

from unsc_fast.statistics import sketch
from unsc_fast.statistics import policies
from unsc_fast.solve.checks import check_subtraction
from unsc_fast.solve.complement import prefers_complement

KEEP_COVARIANCES = ("all", "rank0", "none")
CRITERIA = ("total", "per_label")  # the energy kept: of the summed covariance, or of every label's own


def check_keep(keep_covariances: str) -> str:
    """What a build leaves in the store: ``"all"``, ``"none"``, or ``"rank0"`` (a distributed
    build moves every covariance onto rank 0; on one process it keeps them all)."""
    if keep_covariances not in KEEP_COVARIANCES:
        raise ValueError(f"keep_covariances must be one of {KEEP_COVARIANCES}, got {keep_covariances!r}")
    return keep_covariances


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"build(): criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


def request_keys(store, statistics: str, groups: list, forget: list, exclude: set, include, subtract: set,
                 allow_unobserved: bool) -> tuple[list, list]:
    """``(kept, subtracted)`` keys of a build: what is summed, and what is taken away from it
    (the user's ``subtract`` plus the forget passes whose rows sit inside the kept keys)."""
    if statistics == "total":
        if (exclude or include is not None or subtract) and not forget:
            raise ValueError(
                'statistics="total" keeps no per-label covariance: observe the request\'s forget data '
                "with observe(forget=True) or collect(loader, forget=True), then build()"
            )
        return [policies.TOTAL_KEY], forget
    kept = store.kept_keys(groups, exclude, include, subtract, allow_unobserved=allow_unobserved)
    inside = [k for k in forget if policies.forget_label(k) is None or policies.forget_label(k) in kept]
    return kept, list(subtract) + inside


def local_bases(store, slots: dict, sketches: dict, sketch_slots: dict, devices: dict, kept: list, subtracted: list,
                threshold: float, generator, method: str) -> tuple[dict, dict]:
    """``(bases, complements)``: a basis per slot from this process's statistics, each on its
    parameter's device, and the complement the solver found with it (eigh's other
    eigenvectors) or None (``bases.NullSpaceBases.install`` decides which to keep)."""
    bases, complements = {}, {}
    for slot in slots.values():  # one kept sum alive at a time
        if slot.name in sketch_slots:
            bases[slot.name] = sketch_basis(sketches, slot.name, kept, subtracted, threshold).to(devices[slot.name])
            continue
        covariance = store.kept_sum(slot.name, kept, subtracted)
        check_subtraction(store, slot.name, covariance, kept, subtracted)
        basis, complement = solve_slot(slot, covariance, threshold, generator, method)
        del covariance
        bases[slot.name] = basis.to(devices[slot.name])
        if complement is not None:
            complements[slot.name] = complement.to(devices[slot.name])
    return bases, complements


def solve_slot(slot, covariance: torch.Tensor, threshold: float, generator, method: str) -> tuple:
    """``(basis, complement or None)`` of one slot's kept sum (consumed: symmetrised in
    place). The solver's complement is kept only where projecting with it is cheaper, and
    dropped here otherwise, before the next slot's sum exists. A distributed build solves
    its pooled sums with this same function."""
    basis, complement = slot.solve_with_complement(covariance, threshold, generator, method)
    if complement is None or not prefers_complement(basis.shape[-1], slot.dim):
        return basis, None
    return basis, complement


def sketch_basis(sketches: dict, name: str, kept: list, subtracted: list, threshold: float) -> torch.Tensor:
    present = [k for k in subtracted if name in sketches.get(k, {})]
    if present:
        raise ValueError(
            f"layer {name!r} is sketched: its statistics cannot be subtracted from (keys {present}); "
            "serve the request by excluding whole labels/groups, or observe the remaining data"
        )
    parts = [sketches[k][name] for k in kept if name in sketches.get(k, {})]
    if not parts:
        raise RuntimeError(f"layer {name!r} saw no input under keys {kept}")
    return sketch.basis(parts, threshold, name)
