"""Unlearning methods behind one interface, for comparing them on the same model and data.

    from unsc_fast.evaluation.methods import get_method
    result = get_method("natmu")(original_model, scenario, {"epochs": 3}, seed=0)
    result.model, result.seconds

Every method takes ``(original_model, scenario, settings, seed, progress)``, leaves the
original untouched and returns a ``MethodResult``. ``METHODS`` lists them in table order.
"""
from __future__ import annotations

from unsc_fast.evaluation.methods import (
    amnesiac,
    bad_teacher,
    boundary,
    finetune,
    fisher,
    gradient_ascent,
    l1_sparse,
    logit_suppression,
    natmu,
    neggrad_plus,
    random_labels,
    retrain,
    salun,
    scrub,
    ssd,
    unsc,
)
from unsc_fast.evaluation.methods.base import MethodResult, UnlearningMethod, UnsupportedScenario

METHODS: dict[str, UnlearningMethod] = {
    method.name: method
    for method in (
        retrain.METHOD,
        unsc.UNSC,
        unsc.UNSC_OFFICIAL,
        unsc.UNSC_RANDOM_LABELS,
        unsc.UNSC_NO_PROJECTION,
        natmu.METHOD,
        finetune.METHOD,
        gradient_ascent.METHOD,
        random_labels.METHOD,
        boundary.METHOD,
        l1_sparse.METHOD,
        salun.METHOD,
        scrub.METHOD,
        bad_teacher.METHOD,
        ssd.METHOD,
        fisher.METHOD,
        neggrad_plus.METHOD,
        amnesiac.METHOD,
        logit_suppression.METHOD,
    )
}


def get_method(name: str) -> UnlearningMethod:
    """The method called ``name`` (dashes are accepted for underscores)."""
    key = name.replace("-", "_")
    if key not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]


__all__ = ["METHODS", "MethodResult", "UnlearningMethod", "UnsupportedScenario", "get_method"]
