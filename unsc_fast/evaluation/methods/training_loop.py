"""How the baselines fine-tune: an optimizer and schedule by name around the core's one
training loop (``unsc_fast.training.fit``), with the objective optionally negated (gradient
ascent) or regularised (l1-sparse), or a gradient mask on the weights (SalUn)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from unsc_fast.training import Progress, fit, make_loader

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
    loader = make_loader(x, y, batch_size, shuffle=True, seed=seed)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    elif schedule == "constant":
        scheduler = None
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose constant or cosine")

    def objective(loss: torch.Tensor, fraction: float) -> torch.Tensor:
        value = -loss if ascent else loss
        return value if penalty is None else value + penalty(model, fraction)

    def mask_gradients() -> None:
        for parameter, mask in gradient_mask.items():
            if parameter.grad is not None:
                parameter.grad.mul_(mask)

    losses = fit(model, loader, opt, epochs=epochs, objective=objective, scheduler=scheduler,
                 after_backward=mask_gradients if gradient_mask is not None else None,
                 progress=progress, label=label)
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
