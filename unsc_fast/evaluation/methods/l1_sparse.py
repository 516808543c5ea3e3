"""l1-sparse unlearning (Jia et al. 2023, "Model sparsity can simplify machine unlearning"):
fine-tune on the remaining data with an l1 penalty on the weights whose strength decays
linearly to zero; the sparsity pushes the model away from forget-specific weights."""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import fine_tune

DEFAULTS = dict(epochs=5, lr=0.05, momentum=0.9, alpha=2e-3, batch_size=64)


def l1_penalty(alpha: float):
    """alpha * (1 - t) * sum |w| over every parameter, t = fraction of training done."""
    def penalty(model, done: float):
        return alpha * (1.0 - done) * sum(parameter.abs().sum() for parameter in model.parameters())
    return penalty


def run(model, scenario, settings, seed, progress):
    fine_tune(model, *scenario.remain, epochs=settings["epochs"], lr=settings["lr"], momentum=settings["momentum"],
              batch_size=settings["batch_size"], penalty=l1_penalty(settings["alpha"]), seed=seed,
              progress=progress, label="l1-sparse")


METHOD = UnlearningMethod("l1_sparse", "l1-sparse", run, DEFAULTS, summary="fine-tune with a decaying l1 penalty")
