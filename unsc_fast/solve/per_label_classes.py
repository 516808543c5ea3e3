"""The per-label criterion where no dense per-label matrix is kept: one total with class sketches.

``per_label`` cuts the eigenvectors of the kept sum at the smallest ``k`` where every kept label
keeps ``threshold`` of its own energy, ``tr(V_k^T C_c V_k) >= t tr(C_c)``. Under one total
(``statistics="total"``, chosen by ``"auto"`` or folded into when the labels outgrew the
budget) the kept sum is the total less the request's forget pass, and each kept label's
statistic comes from ``class_statistics`` (``unsc_fast.statistics.class_statistics``): the
exact trace ``tr(C_c)`` and its class sketch's ``B_c^T B_c <= C_c`` (Loewner). So every
fraction ``tr(V_k^T B_c^T B_c V_k) / tr(C_c)`` is a lower bound of the label's true fraction
and the cut is conservative: each kept label keeps *at least* the threshold of its own true
energy. A label whose sketch holds less than the threshold of its trace at all asks for every
direction its sketch has (``LabelSpectrum.rank``): the basis then grows, never the promise.

The kept labels' class sketches are only valid for the remaining data when the forget pass
holds rows of the excluded labels alone (a class-wise request): a labelled forget pass of a
kept label is refused by ``class_statistics``, and an unlabelled one is refused here when it
holds more energy, in any slot, than the excluded labels' exact traces (it then has rows of
kept labels: a sample-wise request). Where no class statistic exists (a total kept without
class sketches) the request is refused with ``PerLabelUnavailable``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from unsc_fast.solve.checks import check_subtraction
from unsc_fast.solve.per_label import LabelSpectrum, SpectrumCache, label_spectrum
from unsc_fast.statistics import policies

# The unlabelled forget pass may exceed the excluded labels' traces by the rounding of two
# fp64 sums of the same rows (as for sketched slots, ``solve.request.UNLABELLED_FORGET_SLACK``).
FORGET_ENERGY_SLACK = 1e-9


class PerLabelUnavailable(ValueError):
    """``build(criterion="per_label")`` cannot be served from the statistics kept
    (``unlearn()`` falls back to ``criterion="total"`` with a warning)."""


def total_class_bases(store, slots: dict, devices: dict, kept: list, subtracted: list, labels: list,
                      threshold: float, cache: SpectrumCache, class_statistics: Callable[[str, list], Iterable],
                      excluded_energy: Callable[[str], float]) -> tuple[dict, dict]:
    """``(bases, complements)`` of the dense and diagonal ``slots`` by the per-label criterion under
    one total: ``kept`` / ``subtracted`` are the total's keys (the total, the forget passes),
    ``labels`` the kept labels, ``class_statistics(slot, labels)`` yields ``(label, trace,
    gram <= C_c)`` per label, and ``excluded_energy(slot)`` is the exact energy of the observed
    labels the request leaves out (what a class-wise forget pass may hold at most)."""
    signature = ("total", id(store), store.version, tuple(labels), tuple(subtracted))
    if cache.signature != signature:
        cache.clear()
    bases, complements = {}, {}
    for slot in slots.values():
        if slot.kind == "diagonal":
            bases[slot.name] = slot.solve(store.kept_sum(slot.name, kept, subtracted), 1.0).to(devices[slot.name])
            continue
        spectrum = cache.spectra.get(slot.name)
        if spectrum is None:
            spectrum = cache.spectra[slot.name] = _slot_spectrum(store, slot, kept, subtracted, labels,
                                                                 class_statistics, excluded_energy)
        if slot.kind == "grouped":
            cuts = [part.cut(threshold)[0] for part in spectrum]
            basis = cuts[0].new_zeros((slot.groups, slot.dim, max(b.shape[1] for b in cuts)))
            for index, part in enumerate(cuts):
                basis[index, :, : part.shape[1]] = part
            bases[slot.name] = basis.to(devices[slot.name])
        else:
            basis, complement = spectrum.cut(threshold)
            bases[slot.name], complements[slot.name] = basis.to(devices[slot.name]), complement.to(devices[slot.name])
    cache.signature = signature
    return bases, complements


def _slot_spectrum(store, slot, kept: list, subtracted: list, labels: list, class_statistics,
                   excluded_energy) -> LabelSpectrum | list[LabelSpectrum]:
    try:
        statistics = class_statistics(slot.name, labels)  # refuses a total without class sketches now
    except LookupError as error:
        raise PerLabelUnavailable(f'build(criterion="per_label"): {error}; use criterion="total"') from None
    if subtracted:
        _check_forget_pass(store, slot, excluded_energy(slot.name))
    total = store.kept_sum(slot.name, kept, subtracted)
    check_subtraction(store, slot.name, total, kept, subtracted)
    try:
        if slot.kind != "grouped":
            return label_spectrum(total, statistics)
        grams = [(s.key, s.trace, s.gram) for s in statistics]  # (g,) traces, (g, d, d) grams
        return [label_spectrum(total[g], ((key, float(trace[g]), gram[g]) for key, trace, gram in grams))
                for g in range(slot.groups)]
    except LookupError as error:  # raised one label at a time, while the generator is consumed
        raise PerLabelUnavailable(f'build(criterion="per_label"): {error}; use criterion="total"') from None


def _check_forget_pass(store, slot, allowed: float) -> None:
    """Refuse a forget pass holding more energy than the excluded labels' rows (``allowed``)."""
    forget = store.diagonal(policies.FORGET_KEY, slot.name)
    if forget is None:
        return
    energy = float(forget.to(torch.float64).sum())
    slack = max(FORGET_ENERGY_SLACK, 1024 * torch.finfo(store.dtype).eps)  # a float32 total's own rounding
    if energy > allowed * (1 + slack):
        raise PerLabelUnavailable(
            f'build(criterion="per_label"): layer {slot.name!r}: the forget pass holds more energy ({energy:.6g}) '
            f"than the excluded labels ({allowed:.6g}), so it has rows of kept labels (a sample-wise request): "
            "their class sketches cannot be reduced by those rows; use criterion=\"total\"")
