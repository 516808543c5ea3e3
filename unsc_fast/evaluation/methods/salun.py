"""SalUn (Fan et al. 2024, "SalUn: Empowering machine unlearning via gradient-based weight
saliency"): only the weights most salient for the forget loss may change. Saliency is
|gradient of the forget set's cross-entropy| accumulated over the forget set; the top
``saliency_fraction`` of all weights (globally ranked) form the mask, and the model is then
fine-tuned with random labels (forget data + remaining data) through that mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.random_labels import relabelled_training_set
from unsc_fast.evaluation.methods.training_loop import fine_tune
from unsc_fast.training import eval_mode, make_loader

DEFAULTS = dict(epochs=5, lr=0.01, momentum=0.9, batch_size=64, saliency_fraction=0.5)


def saliency_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fraction: float, batch_size: int = 256):
    """{parameter: 0/1 mask}: 1 on the ``fraction`` of all weights with the largest |grad|."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"saliency_fraction must be in (0, 1], got {fraction}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = [torch.zeros_like(p) for p in parameters]
    device = parameters[0].device
    with eval_mode(model):
        for inputs, targets in make_loader(x, y, batch_size):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs.to(device)), targets.to(device), reduction="sum").backward()
            for total, p in zip(gradients, parameters):
                if p.grad is not None:
                    total += p.grad
    model.zero_grad(set_to_none=True)
    saliency = torch.cat([g.abs().flatten() for g in gradients])
    keep = torch.zeros_like(saliency)
    keep[saliency.topk(max(1, round(fraction * saliency.numel()))).indices] = 1.0
    masks, start = {}, 0
    for p in parameters:
        masks[p] = keep[start : start + p.numel()].view_as(p)
        start += p.numel()
    return masks


def run(model, scenario, settings, seed, progress):
    mask = saliency_mask(model, *scenario.forget, settings["saliency_fraction"])
    x, y, labels = relabelled_training_set(scenario, seed)
    fine_tune(model, x, y, epochs=settings["epochs"], lr=settings["lr"], momentum=settings["momentum"],
              batch_size=settings["batch_size"], gradient_mask=mask, seed=seed, progress=progress, label="salun")
    return {"forget_labels": labels, "mask_fraction": float(sum(m.sum() for m in mask.values()) / sum(m.numel() for m in mask.values()))}


METHOD = UnlearningMethod("salun", "SalUn", run, DEFAULTS, summary="random labels through a gradient-saliency weight mask")
