"""Selective Synaptic Dampening (SSD; Foster et al. 2024, "Fast Machine Unlearning Without
Retraining Through Selective Synaptic Dampening", AAAI), retrain-free and training-free.

Each parameter's importance to a dataset D is the diagonal of the (empirical) Fisher
information, estimated as in the official code (if-loops/selective-synaptic-dampening,
``src/ssd.py::ParameterPerturber.calc_importance``) by the squared gradient of each
mini-batch's mean cross-entropy, averaged over the batches:

    I = mean over batches b of (d L_b / d theta)^2.

With I on the whole training set and I_f on the forget set, a parameter is *selected*
when it matters much more to the forget set than to the data at large, and then dampened in
proportion, never amplified (the paper's selection and dampening rules):

    selected where I_f > alpha * I;   theta <- min(lambda * I / I_f, 1) * theta.

Defaults are the official ones (``forget_*_main.py``: ``dampening_constant`` lambda = 1,
``selection_weighting`` alpha = 10, exponent 1, lower bound 1; batches of 128; model in eval
mode while the gradients are taken). "Whole training set" is remaining + forget data, as
the official ``full_train_dl``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.training import eval_mode, make_loader, model_device

DEFAULTS = dict(alpha=10.0, dampening=1.0, batch_size=128)


def importance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> list[torch.Tensor]:
    """Per parameter: mean over mini-batches of the squared gradient of the batch's mean loss."""
    parameters = list(model.parameters())
    totals = [torch.zeros_like(p) for p in parameters]
    device = model_device(model)
    loader = make_loader(x, y, batch_size)
    with eval_mode(model):
        for inputs, targets in loader:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs.to(device)), targets.to(device)).backward()
            for total, p in zip(totals, parameters):
                if p.grad is not None:
                    total += p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    return [total / max(1, len(loader)) for total in totals]


@torch.no_grad()
def dampen(model: nn.Module, full_importance, forget_importance, alpha: float, dampening: float) -> float:
    """Apply SSD's selection and dampening in place; returns the fraction of parameters selected."""
    selected = total = 0
    for p, full, forget in zip(model.parameters(), full_importance, forget_importance):
        chosen = forget > alpha * full
        factor = (dampening * full / forget).clamp(max=1.0)
        p[chosen] = p[chosen] * factor[chosen]
        selected, total = selected + int(chosen.sum()), total + p.numel()
    return selected / max(1, total)


def run(model, scenario, settings, seed, progress):
    x_forget, y_forget = scenario.forget
    x_remain, y_remain = scenario.remain
    forget_importance = importance(model, x_forget, y_forget, settings["batch_size"])
    full_importance = importance(model, torch.cat([x_remain, x_forget]), torch.cat([y_remain, y_forget]),
                                 settings["batch_size"])
    fraction = dampen(model, full_importance, forget_importance, settings["alpha"], settings["dampening"])
    if progress is not None:
        progress(f"ssd: dampened {fraction:.2%} of the parameters")
    return {"selected_fraction": fraction}


METHOD = UnlearningMethod("ssd", "SSD", run, DEFAULTS,
                          summary="dampen the weights far more important to the forget set than to the training set")
