"""Amnesiac machine learning (Graves et al. 2021, "Amnesiac Machine Learning", AAAI), in its
practical form.

The paper's exact method, "amnesiac unlearning", stores every training batch's parameter
update and subtracts the updates of the batches that contained forget samples. That needs
a log of the original training that the harness's interface (an already trained model and
the data) does not have, so this is the paper's other, feasible method, which it calls
"unlearning": relabel every forget sample with a random wrong class and keep training.

Settings follow the implementation the later literature compares against (Foster et al.'s
SSD code, if-loops/selective-synaptic-dampening ``src/forget_random_strategies.py::amnesiac``,
also Chundawat et al.'s): the relabelled forget samples *together with all remaining samples*,
3 epochs of Adam at lr 1e-4, batches of 128, a label drawn uniformly from every class except
the sample's own (a forgotten class may be drawn, unlike ``random_labels``, which also
differs in optimiser and schedule).
"""
from __future__ import annotations

import torch

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import fine_tune

DEFAULTS = dict(epochs=3, lr=1e-4, batch_size=128)


def amnesiac_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random class other than each sample's own."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator)
    return (y.cpu() + shift) % num_classes


def run(model, scenario, settings, seed, progress):
    x_forget, y_forget = scenario.forget
    labels = amnesiac_labels(y_forget, scenario.num_classes, torch.Generator().manual_seed(seed)).to(y_forget.device)
    x_remain, y_remain = scenario.remain
    fine_tune(model, torch.cat([x_remain, x_forget]), torch.cat([y_remain, labels]), epochs=settings["epochs"],
              lr=settings["lr"], optimizer="adamw", weight_decay=0.0, batch_size=settings["batch_size"], seed=seed,
              progress=progress, label="amnesiac")
    return {"forget_labels": labels}


METHOD = UnlearningMethod("amnesiac", "Amnesiac (relabel)", run, DEFAULTS,
                          summary="forget data with random labels + remaining data, Adam (Graves et al.'s feasible variant)")
