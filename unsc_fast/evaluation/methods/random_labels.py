"""Random labels (RL; Golatkar et al. 2020, in the form the SalUn and NatMU code use): each
forget sample gets a random wrong label (never its own, never a forgotten class) and the
model is fine-tuned on those together with the remaining data, which anchors what stays."""
from __future__ import annotations

import torch

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import excluded_classes, fine_tune
from unsc_fast.calibration import random_labels

DEFAULTS = dict(epochs=5, lr=0.01, momentum=0.9, batch_size=64)


def relabelled_training_set(scenario, seed: int):
    """Remaining samples with their labels plus forget samples with random wrong labels."""
    x_forget, y_forget = scenario.forget
    generator = torch.Generator().manual_seed(seed)
    labels = random_labels(y_forget, scenario.num_classes, excluded_classes(scenario), generator)
    x_remain, y_remain = scenario.remain
    return torch.cat([x_remain, x_forget]), torch.cat([y_remain, labels]), labels


def run(model, scenario, settings, seed, progress):
    x, y, labels = relabelled_training_set(scenario, seed)
    fine_tune(model, x, y, epochs=settings["epochs"], lr=settings["lr"], momentum=settings["momentum"],
              batch_size=settings["batch_size"], seed=seed, progress=progress, label="random labels")
    return {"forget_labels": labels}


METHOD = UnlearningMethod("random_labels", "random labels + remaining data", run, DEFAULTS,
                          summary="forget data with random wrong labels + remaining data")
