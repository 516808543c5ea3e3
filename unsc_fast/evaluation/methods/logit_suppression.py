"""``logit_suppression``: the trivial "solution" to class forgetting, kept as a yardstick (issue 27).

The forgotten classes' output biases are lowered until their logits lie below every remaining
class's logit on every training sample; nothing else changes. Remaining predictions are
untouched (bit for bit: no other output depends on those biases) and the forgotten classes
are never predicted on the training data, so output-level metrics call it a perfect unlearner,
while the features are exactly the original's. A method that forgets for real must be closer
to the retrained model than this one on the representation metrics (``representation.py``).
"""
from __future__ import annotations

import torch

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.representation import classifier_layer
from unsc_fast.training import predict_logits

DEFAULTS = dict(margin=1.0)  # logits of the forgotten classes end at least this far below the lowest remaining one


def suppression_shift(logits: torch.Tensor, forgotten, margin: float) -> float:
    """How far to lower the forgotten classes' biases so that, on every row of ``logits``, each of
    them lies at least ``margin`` below every remaining class's logit."""
    remaining = [c for c in range(logits.shape[1]) if c not in set(forgotten)]
    excess = (logits[:, list(forgotten)].max(1).values - logits[:, remaining].min(1).values).max()
    return max(float(excess), 0.0) + margin


def run(model, scenario, settings, seed, progress):
    forgotten = list(scenario.forget_classes)
    x_train = scenario.split.x_train  # every sample the model was trained on that is still held
    name, layer = classifier_layer(model, x_train)
    if layer.bias is None:
        raise ValueError(f"logit_suppression lowers the classifier layer's bias, and {name!r} has none")
    shift = suppression_shift(predict_logits(model, x_train).double(), forgotten, settings["margin"])
    with torch.no_grad():
        layer.bias[forgotten] -= shift
    logits = predict_logits(model, x_train)
    remaining = [c for c in range(logits.shape[1]) if c not in set(forgotten)]
    if not bool((logits[:, forgotten].max(1).values < logits[:, remaining].min(1).values).all()):
        raise RuntimeError(f"lowering {name!r}'s bias did not push the forgotten classes below the others: "
                           "the model transforms that layer's output before its logits")
    return {"layer": name, "bias_shift": shift}


METHOD = UnlearningMethod(
    "logit_suppression", "logit suppression (trivial baseline)", run, DEFAULTS, scenarios=("full_class",),
    unsupported_reason="it lowers whole classes' logits; a sample-wise or sub-class request has no class to suppress",
    summary="the forgotten classes' output biases lowered below every remaining logit, nothing else changed")
