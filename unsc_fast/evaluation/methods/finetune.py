"""Fine-tune (FT) on the remaining data only (Warnecke et al. 2023; a baseline in UNSC, NatMU
and SalUn): forgetting relies on catastrophic forgetting of what is no longer rehearsed."""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import fine_tune

DEFAULTS = dict(epochs=5, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64)


def run(model, scenario, settings, seed, progress):
    fine_tune(model, *scenario.remain, epochs=settings["epochs"], lr=settings["lr"], momentum=settings["momentum"],
              weight_decay=settings["weight_decay"], batch_size=settings["batch_size"], seed=seed,
              progress=progress, label="finetune")


METHOD = UnlearningMethod("finetune", "fine-tune", run, DEFAULTS, summary="SGD on the remaining data")
