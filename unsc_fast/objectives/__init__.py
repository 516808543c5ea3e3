"""Unlearning objectives: what is minimised on the forget (and retain) data.

Pure functions of logits, labels and reference log-probabilities (never of models), so that
any training loop (``unlearn()``, a user's own, the harness's baselines) can use them and the
tests can hold them to plain reference computations.
"""
from unsc_fast.objectives.language import (
    IGNORE_INDEX,
    grad_diff_loss,
    gradient_ascent_loss,
    next_token_nll,
    npo_loss,
    sequence_log_probs,
    token_log_probs,
)

__all__ = [
    "IGNORE_INDEX", "token_log_probs", "sequence_log_probs", "next_token_nll", "gradient_ascent_loss",
    "npo_loss", "grad_diff_loss",
]
