"""Boundary unlearning, "boundary shrink" (Chen et al. 2023, "Boundary Unlearning: Rapid
Forgetting of Deep Networks via Shifting the Decision Space"): each forget sample is
relabelled with the class its FGSM adversarial example falls into, its nearest decision
boundary, and the model is fine-tuned on the forget data with those labels.

Where the attack does not cross a boundary, the most likely class other than the sample's
own (and other than any forgotten class) at the adversarial point is taken, so the new
label always differs from the true one. The method is defined for class-level forgetting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import excluded_classes, fine_tune
from unsc_fast.training import eval_mode, model_device, predict_logits
from unsc_fast.calibration import disallowed_labels

DEFAULTS = dict(epsilon=0.5, epochs=5, lr=2e-3, momentum=0.9, batch_size=32)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """x + epsilon * sign(grad_x CE(model(x), y)), computed in eval mode (Goodfellow et al. 2015)."""
    x = x.to(model_device(model)).clone().requires_grad_(True)
    with eval_mode(model):
        loss = F.cross_entropy(model(x), y.to(x.device))
    (gradient,) = torch.autograd.grad(loss, x)
    return (x + epsilon * gradient.sign()).detach()


def boundary_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, excluded=()) -> torch.Tensor:
    """The class each sample's adversarial example is predicted as, never its own or an excluded one."""
    logits = predict_logits(model, fgsm(model, x, y, epsilon)).float().cpu()
    return logits.masked_fill(disallowed_labels(logits.shape[1], y.cpu(), excluded), float("-inf")).argmax(1)


def run(model, scenario, settings, seed, progress):
    x_forget, y_forget = scenario.forget
    labels = boundary_labels(model, x_forget, y_forget, settings["epsilon"], excluded_classes(scenario))
    fine_tune(model, x_forget, labels, epochs=settings["epochs"], lr=settings["lr"], momentum=settings["momentum"],
              batch_size=settings["batch_size"], seed=seed, progress=progress, label="boundary")
    return {"forget_labels": labels}


METHOD = UnlearningMethod(
    "boundary", "boundary unlearning", run, DEFAULTS, scenarios=("full_class",),
    unsupported_reason="boundary shrink moves a whole class's decision region (Chen et al. 2023 define it for class "
                       "forgetting only); relabelling random samples with it would be a different, unpublished method",
    summary="relabel with the FGSM neighbour class, fine-tune on the forget data",
)
