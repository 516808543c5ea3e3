"""Solving one request on this process: which keys it sums and subtracts, and a basis per slot.

The statistics policy decides the keys (per label: the kept labels, less ``subtract`` and the
forget passes inside them; total: the one total, less every forget pass). Each slot's kept
sum is solved on its own (one sum alive at a time, so a build peaks at one extra matrix per
slot); sketched layers take their basis from the Frequent Directions sketch instead.
"""
from __future__ import annotations

from dataclasses import dataclass

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


# An unlabelled forget pass on a sketched slot is taken as the excluded labels' rows when its
# energy does not exceed theirs by more than the rounding of two fp64 sums of the same rows.
UNLABELLED_FORGET_SLACK = 1e-9


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


@dataclass(frozen=True)
class SketchRequest:
    """What a build sums on a sketched slot (``kept``), the forget passes it must refuse there
    (``refused``: rows of a kept key), and, under one total, the unlabelled forget passes
    taken as the ``excluded`` labels' data (their energy may not exceed those labels')."""

    kept: tuple
    refused: tuple
    unlabelled: tuple = ()
    excluded: tuple = ()


def sketch_keys(statistics: str, sketches: dict, kept: list, subtracted: list, exclude: set, include,
                subtract: set) -> SketchRequest:
    """Per-label storage: the dense request's keys. One total: sketches are still kept per
    label, so the kept labels are the observed ones less ``exclude``/``subtract`` (within
    ``include``); a labelled forget pass of a kept label is a sample-wise request, which a
    sketch cannot serve."""
    if statistics != "total":
        return SketchRequest(tuple(kept), tuple(subtracted))
    labels = [k for k in sketches if not policies.is_forget_key(k)]
    kept_labels = [k for k in labels if k not in exclude and k not in subtract and (include is None or k in include)]
    forget = [k for k in sketches if policies.is_forget_key(k)]
    return SketchRequest(tuple(kept_labels), tuple(k for k in forget if policies.forget_label(k) in kept_labels),
                         tuple(k for k in forget if policies.forget_label(k) not in labels),
                         tuple(k for k in labels if k not in kept_labels))


def local_bases(store, slots: dict, sketches: dict, sketch_slots: dict, devices: dict, kept: list, subtracted: list,
                threshold: float, generator, method: str, request: SketchRequest | None = None) -> tuple[dict, dict]:
    """``(bases, complements)``: a basis per slot from this process's statistics, each on its
    parameter's device, and the complement the solver found with it (eigh's other
    eigenvectors) or None (``bases.NullSpaceBases.install`` decides which to keep)."""
    bases, complements = {}, {}
    # One kept sum alive at a time, the widest first: its solve (a dense fp64 eigh holds about
    # 3.3 d x d doubles, ``ops.dense.lean_eigh``) then runs before the other slots' bases pile up beside it.
    for slot in sorted(slots.values(), key=lambda s: -s.dim * s.groups ** 0.5 if s.kind != "diagonal" else 0):
        if slot.name in sketch_slots:
            request = request or SketchRequest(tuple(kept), tuple(subtracted))
            bases[slot.name] = sketch_basis(sketches, slot, request, threshold).to(devices[slot.name])
            continue
        covariance = store.kept_sum(slot.name, kept, subtracted)
        check_subtraction(store, slot.name, covariance, kept, subtracted)
        basis, complement = solve_slot(slot, covariance, threshold, generator, method)
        del covariance
        bases[slot.name] = basis.to(devices[slot.name])
        if complement is not None:
            complements[slot.name] = complement.to(devices[slot.name])
    return {name: bases[name] for name in slots}, complements


def solve_slot(slot, covariance: torch.Tensor, threshold: float, generator, method: str) -> tuple:
    """``(basis, complement or None)`` of one slot's kept sum (consumed: symmetrised in
    place). The solver's complement is kept only where projecting with it is cheaper, and
    dropped here otherwise, before the next slot's sum exists. A distributed build solves
    its pooled sums with this same function."""
    basis, complement = slot.solve_with_complement(covariance, threshold, generator, method)
    if complement is None or not prefers_complement(basis.shape[-1], slot.dim):
        return basis, None
    return basis, complement


def sketched_parts(sketches: dict, name: str, request: SketchRequest) -> list:
    """The kept keys' sketches of slot ``name``, after refusing what a sketch cannot serve."""
    check_sketch_request({k: {n: s.trace for n, s in per.items()} for k, per in sketches.items()}, name, request)
    parts = [sketches[k][name] for k in request.kept if name in sketches.get(k, {})]
    if not parts:
        raise RuntimeError(f"layer {name!r} saw no input under keys {list(request.kept)}")
    return parts


def check_sketch_request(energies: dict, name: str, request: SketchRequest) -> None:
    """Refuse, on slot ``name``, a forget pass that a sketch cannot serve; ``energies``:
    ``{key: {slot: energy}}`` (pooled over the ranks in a distributed build)."""
    present = [k for k in request.refused if name in energies.get(k, {})]
    if present:
        raise ValueError(
            f"layer {name!r} is sketched: its statistics cannot be subtracted from (keys {present}); "
            "serve the request by excluding whole labels/groups, or observe the remaining data"
        )
    unlabelled = sum(energies[k][name] for k in request.unlabelled if name in energies.get(k, {}))
    excluded = sum(energies[k][name] for k in request.excluded if name in energies.get(k, {}))
    if unlabelled > excluded * (1 + UNLABELLED_FORGET_SLACK):
        raise ValueError(
            f"layer {name!r} is sketched: the unlabelled forget pass holds more energy ({unlabelled:.6g}) than the "
            f"excluded labels {list(request.excluded)} ({excluded:.6g}), so it has rows of kept labels: a "
            "sample-wise request cannot be served from a sketch (observe the forget pass with its labels, or "
            "re-observe the affected labels' remaining samples)"
        )


def sketch_basis(sketches: dict, slot, request: SketchRequest, threshold: float) -> torch.Tensor:
    return sketch.slot_basis(sketched_parts(sketches, slot.name, request), threshold, slot.name,
                             slot.kind == "grouped")
