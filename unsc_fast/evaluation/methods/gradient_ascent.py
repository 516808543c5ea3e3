"""Gradient ascent (GA; Thudi et al. 2022, a baseline in UNSC and SalUn): maximise the loss
on the forget data. It forgets fast and, with nothing anchoring the remaining data, tends to
over-unlearn; few epochs and a small learning rate are the usual guard."""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import fine_tune

DEFAULTS = dict(epochs=3, lr=3e-3, momentum=0.9, batch_size=32)


def run(model, scenario, settings, seed, progress):
    fine_tune(model, *scenario.forget, epochs=settings["epochs"], lr=settings["lr"], momentum=settings["momentum"],
              batch_size=settings["batch_size"], ascent=True, seed=seed, progress=progress, label="gradient ascent")


METHOD = UnlearningMethod("gradient_ascent", "gradient ascent", run, DEFAULTS, summary="maximise the loss on the forget data")
