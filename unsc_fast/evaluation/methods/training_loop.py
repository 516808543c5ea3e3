"""The fine-tuning loop the baselines share: one objective per batch, optionally negated
(gradient ascent), regularised (l1-sparse) or with a gradient mask on the weights (SalUn)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.training import Progress, make_loader

# penalty(model, fraction_of_training_done) -> scalar tensor added to the loss
Penalty = Callable[[nn.Module, float], torch.Tensor]


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


def fine_tune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    schedule: str = "constant",
    ascent: bool = False,
    penalty: Penalty | None = None,
    gradient_mask: dict[nn.Parameter, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    label: str = "fine-tune",
) -> list[float]:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; returns the mean loss per epoch.

    ``ascent=True`` maximises the loss instead. ``gradient_mask`` multiplies each listed
    parameter's gradient before the step (with weight decay 0, unmasked weights never move).
    ``schedule`` is ``"constant"`` or ``"cosine"`` (annealed to zero over all steps).
    """
    if epochs <= 0 or len(x) == 0:
        return []
    device = next(model.parameters()).device
    loader = make_loader(x, y, batch_size, shuffle=True, seed=seed)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    total_steps = epochs * len(loader)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    elif schedule == "constant":
        scheduler = None
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose constant or cosine")
    model.train()
    losses, step = [], 0
    for epoch in range(epochs):
        total = 0.0
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            loss = F.cross_entropy(model(inputs), targets)
            objective = -loss if ascent else loss
            if penalty is not None:
                objective = objective + penalty(model, step / total_steps)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            if gradient_mask is not None:
                for parameter, mask in gradient_mask.items():
                    if parameter.grad is not None:
                        parameter.grad.mul_(mask)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            total += loss.item() * len(inputs)
        losses.append(total / len(x))
        if progress is not None:
            progress(f"{label}: epoch {epoch + 1}/{epochs}, loss {losses[-1]:.4f}")
    model.eval()
    return losses


def reset_parameters(model: nn.Module) -> nn.Module:
    """Re-initialise every module that knows how (Linear, Conv, BatchNorm...): a fresh model
    of the same architecture, whatever that architecture is."""
    for module in model.modules():
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
    return model


def excluded_classes(scenario) -> tuple[int, ...]:
    """Classes that may not serve as a new label: the forgotten ones in full-class forgetting."""
    return tuple(scenario.forget_classes)
