"""Which tensors ``NullSpaceOptimizer`` projects in one param group: the gradient, the change, or both.

One projection per weight and step is enough for exactness, and which one depends on the inner
optimizer:

- plain ``torch.optim.SGD`` without weight decay (momentum, dampening, nesterov and maximize
  allowed): every step is a linear combination of the gradients it was given, so projecting
  the gradients alone keeps every change in the null space (rounding, damped by the momentum,
  stays at rounding level);
- anything else (weight decay, Adam's per-element scaling, unknown optimizers): only
  projecting the change ``W <- W0 + P(W - W0)`` is exact whatever the optimizer does.

``project_gradients="auto"`` picks that one projection per group at every step (a user may
change a group's weight decay between steps); ``True`` projects both (moments built from
null-space gradients, then the change); ``False`` the change only.
"""
from __future__ import annotations

import torch

PROJECT_GRADIENTS = ("auto", True, False)


def gradients_suffice(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """True where the inner step is linear in past gradients: exactly ``torch.optim.SGD``
    (a subclass may change the rule) with no weight decay in this group."""
    return type(optimizer) is torch.optim.SGD and group.get("weight_decay", 0) == 0


def projections(mode, optimizer: torch.optim.Optimizer, group: dict) -> tuple[bool, bool]:
    """(project the gradient, project the change) for ``group`` under ``project_gradients=mode``."""
    if mode == "auto":
        alone = gradients_suffice(optimizer, group)
        return alone, not alone
    return bool(mode), True


def check_mode(mode, where: str = "project_gradients"):
    """``mode`` itself if it is one of ``PROJECT_GRADIENTS``; a truthy string or 1 is not a
    decision anybody made."""
    if not (isinstance(mode, bool) or (isinstance(mode, str) and mode == "auto")):
        raise ValueError(f"{where} must be True, False or 'auto', got {mode!r}")
    return mode
