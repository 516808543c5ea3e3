"""Retrain from scratch on the remaining data: the gold standard every other method is
measured against (it never saw the forget data, so nothing of it can leak)."""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import reset_parameters
from unsc_fast.evaluation.recipes import train

DEFAULTS = dict(epochs=30, lr=3e-3, weight_decay=5e-4, batch_size=64)


def run(model, scenario, settings, seed, progress):
    """Fresh weights for the same architecture, then the library's usual training recipe."""
    reset_parameters(model)
    train(model, *scenario.remain, epochs=settings["epochs"], lr=settings["lr"], weight_decay=settings["weight_decay"],
          batch_size=settings["batch_size"], seed=seed, progress=progress, label="retrain")


METHOD = UnlearningMethod("retrain", "retrain (gold standard)", run, DEFAULTS, from_scratch=True,
                          summary="train a fresh model on the remaining data only")
