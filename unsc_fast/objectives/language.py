"""Causal language-model losses for unlearning: gradient ascent, NPO and GradDiff.

Conventions (Hugging Face's): ``logits`` (B, T, V) from the model (or its output object with
``.logits``), ``labels`` (B, T) the input tokens with ``-100`` where nothing is predicted
(padding, a question's tokens); position ``t`` predicts ``labels[:, t + 1]``. Log-probs are
computed in float32 or better whatever the logits' dtype.

The formulas follow OpenUnlearning (locuslab/open-unlearning), the reference implementation
of TOFU's baselines: ``src/trainer/utils.py`` (``compute_batch_nll``: the per-sequence sum of
the shifted token NLL, ``-100`` ignored; ``compute_dpo_loss`` with no preferred answer is NPO),
``src/trainer/unlearn/grad_ascent.py`` / ``grad_diff.py`` / ``npo.py`` (the forget term plus
``alpha`` times the retain NLL; OpenUnlearning's defaults ``beta = 0.1``, ``alpha = gamma = 1``).
NPO is Zhang et al., *Negative Preference Optimization*, 2024, eq. (3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unsc_fast.training import logits_of

IGNORE_INDEX = -100
REDUCTIONS = ("sum", "mean")


def _check(logits, labels: torch.Tensor, where: str) -> torch.Tensor:
    logits = logits_of(logits)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{where}: logits must be a floating-point (batch, seq, vocab) tensor, got {got}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != logits.shape[:2]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"{where}: labels must be integer token ids shaped like the logits' (batch, seq) "
            f"{tuple(logits.shape[:2])}, got {got} (a classifier's one label per sample is not a language-model batch)"
        )
    return logits


def token_log_probs(logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, mask)``, both (B, T - 1): ``log p(labels[:, t + 1] | tokens <= t)``, 0 where
    the label is ``-100``, and the mask of the positions that count."""
    logits = _check(logits, labels, "token_log_probs")
    targets = labels[:, 1:]
    shifted = logits[:, :-1]
    dtype = torch.promote_types(shifted.dtype, torch.float32)
    nll = F.cross_entropy(shifted.to(dtype).transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll, targets != IGNORE_INDEX


def sequence_log_probs(logits, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """(B,): each sequence's log-probability of its labelled tokens; ``"sum"`` (NPO's and
    OpenUnlearning's) or ``"mean"`` per labelled token (0 for a sequence without any)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"sequence_log_probs: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    log_probs, mask = token_log_probs(logits, labels)
    total = log_probs.sum(1)
    return total if reduction == "sum" else total / mask.sum(1).clamp(min=1)


def next_token_nll(logits, labels: torch.Tensor) -> torch.Tensor:
    """The mean NLL over every labelled token of the batch: what a Hugging Face causal LM's
    ``outputs.loss`` is (GradDiff's retain term, and the term gradient ascent negates)."""
    log_probs, mask = token_log_probs(logits, labels)
    count = mask.sum()
    if int(count) == 0:
        raise ValueError("next_token_nll: every label is -100, nothing to predict")
    return -log_probs.sum() / count


def gradient_ascent_loss(logits, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget data: minimise ``-NLL`` (OpenUnlearning's GradAscent)."""
    return -next_token_nll(logits, labels)


def npo_loss(logits, labels: torch.Tensor, reference_log_probs: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation on the forget data:
    ``-(2 / beta) * mean_i logsigmoid(-beta * (log p(y_i) - log p_ref(y_i)))``, with the
    sequence log-probabilities summed over the labelled tokens and ``reference_log_probs`` (B,)
    the frozen reference model's (``sequence_log_probs`` of its logits, no grad). As beta -> 0
    it tends to gradient ascent on the summed NLL (times 1, plus a constant); unlike ascent it
    is bounded below, so the forget loss cannot run away once the data is unlikely."""
    if not beta > 0:
        raise ValueError(f"npo_loss: beta must be > 0, got {beta!r}")
    log_probs = sequence_log_probs(logits, labels)
    reference = reference_log_probs.detach().to(log_probs)
    if reference.shape != log_probs.shape:
        raise ValueError(f"npo_loss: reference_log_probs must have one entry per sequence {tuple(log_probs.shape)}, "
                         f"got {tuple(reference.shape)}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (log_probs - reference)).mean()


def grad_diff_loss(forget_loss: torch.Tensor, retain_logits, retain_labels: torch.Tensor,
                   retain_weight: float = 1.0, forget_weight: float = 1.0) -> torch.Tensor:
    """GradDiff's combination: ``forget_weight * forget_loss + retain_weight * NLL(retain)``
    (OpenUnlearning's ``gamma`` and ``alpha``); ``forget_loss`` is gradient ascent's or NPO's."""
    return forget_weight * forget_loss + retain_weight * next_token_nll(retain_logits, retain_labels)
