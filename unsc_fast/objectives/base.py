"""The interface between the unlearning loop and what it minimises.

An objective is a callable ``objective(step) -> loss`` (a scalar tensor to minimise). ``Step``
carries what one step has at hand: the model, the forget batch's inputs and targets, the
model's outputs on them, how far training is, and two things computed only when asked for:
the original (frozen) model's outputs on the same inputs (``reference()``: NPO, distillation)
and the model's outputs on the next retain batch (``retain()``: GradDiff).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn


@dataclass
class Step:
    """One step of unlearning, as an objective sees it."""

    model: nn.Module
    args: tuple
    kwargs: dict
    targets: torch.Tensor | None
    outputs: Any
    fraction_done: float = 0.0
    features: torch.Tensor | None = None  # the classifier's inputs (N, d), when the loop records them
    reference_outputs: Callable[[], Any] | None = None
    retain_batch: Callable[[], tuple[Any, torch.Tensor | None]] | None = None
    extras: dict = field(default_factory=dict)

    def reference(self):
        """The original model's outputs on this step's inputs (no gradient)."""
        if self.reference_outputs is None:
            raise RuntimeError("this objective needs the original model's outputs: the loop was not given a reference")
        return self.reference_outputs()

    def retain(self) -> tuple[Any, torch.Tensor | None]:
        """``(outputs, targets)`` of the model on the next retain batch (with gradient)."""
        if self.retain_batch is None:
            raise RuntimeError("this objective needs retain data: pass retain=... to unlearn()")
        return self.retain_batch()


class Objective(Protocol):
    def __call__(self, step: Step) -> torch.Tensor: ...


class _LossObjective:
    """A plain ``loss(outputs, targets)``, minimised, or maximised for ``"ascent"``, or turned into
    what is minimised by ``objective(loss, fraction_done)`` (the form ``training.fit`` takes)."""

    def __init__(self, loss, objective=None, name: str | None = None) -> None:
        self.loss, self.objective, self.name = loss, objective, name

    def __repr__(self) -> str:
        loss = getattr(self.loss, "__name__", type(self.loss).__name__)
        if self.objective is None:
            return f"minimise {loss}"
        return f"{self.name or getattr(self.objective, '__name__', 'objective')} of {loss}"

    def __call__(self, step: Step) -> torch.Tensor:
        value = self.loss(step.outputs, step.targets)
        step.extras["loss"] = value  # what the run reports per pass: the loss, not what is minimised
        if self.objective is None:
            return value
        return self.objective(value, step.fraction_done)


def as_objective(loss, objective) -> Objective:
    """The loop's objective from ``unlearn``'s ``loss=`` / ``objective=`` arguments: ``objective``
    may be a ``Step`` callable (``needs_step = True`` on it, or an ``Objective`` class of this
    package), ``"ascent"``, or ``(loss, fraction) -> tensor`` applied to ``loss(outputs, targets)``."""
    if objective is None:
        return _LossObjective(loss)
    if objective == "ascent":
        return _LossObjective(loss, lambda value, _fraction: -value, name="ascent")
    if getattr(objective, "needs_step", False):
        return objective
    if callable(objective):
        return _LossObjective(loss, objective)
    raise ValueError(f"objective must be None, 'ascent', a Step objective or a callable (loss, fraction), got {objective!r}")
