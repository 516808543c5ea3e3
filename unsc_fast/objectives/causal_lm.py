"""Step objectives for causal language models: gradient ascent, NPO, GradDiff and a custom one.

Each wraps the pure losses of ``language`` so that ``unlearn()``'s loop can run it: it gets
a ``Step`` (the forget batch's inputs, targets and the model's outputs; the frozen original's
outputs through ``step.reference()`` when it ``needs_reference``; the model's outputs on the
next retain batch through ``step.retain()`` when it ``needs_retain``) and returns what is
minimised. Every one reports the forget batch's next-token NLL as the run's loss
(``step.extras["loss"]``), so runs with different objectives read alike.

The targets are the batch's per-token labels (``-100``: not scored); a batch without any
(``(B, T)`` tokens alone, or a dict batch without ``"labels"``) is scored on every real token
(``token_labels``). Formulas and defaults follow OpenUnlearning (see ``language``).
"""
from __future__ import annotations

from typing import Callable

import torch

from unsc_fast.objectives.language import (
    IGNORE_INDEX,
    grad_diff_loss,
    next_token_nll,
    npo_loss,
    sequence_log_probs,
)


def token_labels(args: tuple, kwargs: dict, targets) -> torch.Tensor | None:
    """The per-token labels of a batch: its targets, or (none given) its tokens with ``-100``
    where the ``attention_mask`` is 0. None when the batch holds no integer (B, T) tokens."""
    if targets is not None:
        return targets
    tokens = args[0] if args else kwargs.get("input_ids")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        return None
    mask = kwargs.get("attention_mask")
    return tokens if mask is None else tokens.masked_fill(mask == 0, IGNORE_INDEX)


def _labels(step) -> torch.Tensor:
    labels = token_labels(step.args, step.kwargs, step.targets)
    if labels is None:
        raise ValueError("a language-model objective needs per-token labels or (batch, seq) integer tokens; "
                         "this batch has neither (is it a classifier's batch?)")
    return labels


class LanguageObjective:
    """Marks a Step objective for a causal LM (``unlearn()`` then treats the data as token
    sequences and keeps its targets)."""

    needs_step = True
    language_model = True
    needs_reference = False
    needs_retain = False


class GradientAscent(LanguageObjective):
    """Maximise the forget batch's mean next-token NLL (OpenUnlearning's GradAscent). Unbounded:
    without a stop rule the model leaves every fact, and then everything else."""

    def __call__(self, step) -> torch.Tensor:
        nll = next_token_nll(step.outputs, _labels(step))
        step.extras["loss"] = nll.detach()
        return -nll

    def __repr__(self) -> str:
        return "GradientAscent()"


class NPO(LanguageObjective):
    """Negative preference optimisation against the frozen original (``npo_loss``, ``beta``):
    bounded below, so its push on a sequence fades once the sequence is unlikely."""

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        if not beta > 0:
            raise ValueError(f"NPO: beta must be > 0, got {beta!r}")
        self.beta = float(beta)

    def __call__(self, step) -> torch.Tensor:
        labels = _labels(step)
        reference = sequence_log_probs(step.reference(), labels).detach()
        step.extras["loss"] = next_token_nll(step.outputs, labels).detach()
        return npo_loss(step.outputs, labels, reference, self.beta)

    def __repr__(self) -> str:
        return f"NPO(beta={self.beta:g})"


class GradDiff(LanguageObjective):
    """``forget_weight * forget(step) + retain_weight * NLL(next retain batch)``
    (OpenUnlearning's GradDiff with ``gamma`` and ``alpha``); ``forget``: gradient ascent
    (default) or ``NPO(...)`` (OpenUnlearning's NPO is ``GradDiff(NPO())``)."""

    needs_retain = True

    def __init__(self, forget: LanguageObjective | None = None, retain_weight: float = 1.0,
                 forget_weight: float = 1.0) -> None:
        if retain_weight < 0 or forget_weight < 0:
            raise ValueError(f"GradDiff: weights must be >= 0, got retain_weight={retain_weight}, "
                             f"forget_weight={forget_weight}")
        self.forget = GradientAscent() if forget is None else forget
        self.retain_weight, self.forget_weight = float(retain_weight), float(forget_weight)

    @property
    def needs_reference(self) -> bool:
        return bool(getattr(self.forget, "needs_reference", False))

    def __call__(self, step) -> torch.Tensor:
        forget = self.forget(step)
        if self.retain_weight == 0.0:
            return self.forget_weight * forget
        outputs, targets = step.retain()
        return grad_diff_loss(forget, outputs, targets, self.retain_weight, self.forget_weight)

    def __repr__(self) -> str:
        return f"GradDiff(forget={self.forget!r}, retain_weight={self.retain_weight:g})"


class Custom(LanguageObjective):
    """A user's ``function(step) -> loss`` as a language-model objective: ``step.outputs``,
    ``step.targets`` (per-token labels), ``step.args`` / ``step.kwargs`` (the batch's inputs),
    ``step.reference()`` (the frozen original's outputs; ``reference=True``) and
    ``step.retain()`` (``retain=True``)."""

    def __init__(self, function: Callable, *, reference: bool = False, retain: bool = False) -> None:
        if not callable(function):
            raise TypeError(f"Custom: expected a callable(step) -> loss, got {type(function).__name__}")
        self.function, self.needs_reference, self.needs_retain = function, bool(reference), bool(retain)

    def __repr__(self) -> str:
        return f"Custom({getattr(self.function, '__name__', type(self.function).__name__)})"

    def __call__(self, step) -> torch.Tensor:
        labels = token_labels(step.args, step.kwargs, step.targets)
        if labels is not None and "loss" not in step.extras:
            step.extras["loss"] = next_token_nll(step.outputs, labels).detach()
        return self.function(step)


NAMES = {"ascent": GradientAscent, "npo": NPO, "graddiff": GradDiff}


def language_objective(name: str) -> LanguageObjective:
    """The objective ``unlearn(objective=name)`` runs on a language model's data."""
    if name not in NAMES:
        raise ValueError(f"objective for a language model must be one of {sorted(NAMES)} or an objective object, "
                         f"got {name!r}")
    return NAMES[name]()
