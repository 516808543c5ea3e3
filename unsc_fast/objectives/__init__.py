"""What unlearning minimises: objectives that see one training step (``Step``) and return the
loss (``base``, ``classification``), and the language-model losses as pure functions of logits,
labels and reference log-probabilities (``language``: never of models, so that any training
loop can use them and the tests can hold them to plain reference computations)."""
from unsc_fast.objectives.base import Objective, Step, as_objective
from unsc_fast.objectives.classification import CrossEntropy, FeatureErasure
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
    "Objective", "Step", "as_objective", "CrossEntropy", "FeatureErasure",
    "IGNORE_INDEX", "token_log_probs", "sequence_log_probs", "next_token_nll", "gradient_ascent_loss",
    "npo_loss", "grad_diff_loss",
]
