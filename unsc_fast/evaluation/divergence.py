"""Distance of an unlearned model to the model retrained without the forget data.

Accuracy gaps say whether two models get the same *number* of samples right; they do not
say whether the two models make the same predictions. This module compares the outputs
themselves, sample by sample, and computes the tug-of-war score:

* **KL and JS divergence of the softmax outputs** on the forget, remaining and test sets.
  ``KL(p_retrain || p_model)`` is the information lost when the unlearned model stands in
  for the retrained one (the retrained model's outputs are the target distribution, so
  they come first); it is unbounded. The Jensen-Shannon divergence ``JS = (KL(p || m) + KL(q || m)) / 2`` with
  ``m = (p + q) / 2`` is symmetric and bounded by ln 2 (natural log), so it reads on a fixed
  scale. Both are averaged over the samples of a set; 0 means identical outputs.
* **Tug-of-war (ToW)**, Zhao et al. 2024, "What makes unlearning hard and what to do about
  it" (NeurIPS 2024):

      ToW = (1 - da(S_forget)) * (1 - da(S_retain)) * (1 - da(S_test)),
      da(S) = |acc(unlearned, S) - acc(retrained, S)|,  accuracies in [0, 1].

  It is 1 when the unlearned model matches the retrained one's accuracy on all three sets
  and falls towards 0 as it drifts on any of them (the product punishes trading one set
  for another, hence the name). Retain is the remaining training data, test the whole
  test set, as in the paper.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from unsc_fast.training import predict_logits

# key -> column title, in table order
DIVERGENCE_TITLES = {
    "kl_forget": "KL forget",
    "kl_remain": "KL remain",
    "kl_test": "KL test",
    "js_forget": "JS forget",
    "js_remain": "JS remain",
    "js_test": "JS test",
    "tow": "ToW",
}


def _log_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x).double().cpu().log_softmax(1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) = sum_c p_c (log p_c - log q_c), from log-probabilities (N, C)."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence (natural log, in [0, ln 2]) from log-probabilities."""
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return (0.5 * (kl_divergence(log_p, log_m) + kl_divergence(log_q, log_m))).clamp_min(0.0)  # no -0.0 from rounding


def output_divergences(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(reference || model), JS(reference, model)) for every sample of ``x``."""
    log_reference, log_model = _log_probabilities(reference, x), _log_probabilities(model, x)
    return kl_divergence(log_reference, log_model), js_divergence(log_reference, log_model)


def _accuracy(log_probabilities: torch.Tensor, y: torch.Tensor) -> float:
    return float((log_probabilities.argmax(1) == y.cpu()).double().mean())


def tug_of_war(model: nn.Module, reference: nn.Module, sets) -> float:
    """Zhao et al. 2024's ToW: prod over ``sets`` of (1 - |acc(model) - acc(reference)|), acc in [0, 1].

    ``sets`` is an iterable of (x, y) pairs (forget, retain, test in the paper); an empty set
    contributes a factor 1 (nothing to disagree on).
    """
    score = 1.0
    for x, y in sets:
        if len(x) == 0:
            continue
        score *= 1.0 - abs(_accuracy(_log_probabilities(model, x), y) - _accuracy(_log_probabilities(reference, x), y))
    return score


def distance_to_retrain(model: nn.Module, reference: nn.Module, scenario) -> dict:
    """Mean KL and JS on forget/remaining/test data and ToW of ``model`` against ``reference``
    (the retrained model of the same seed); keys as in ``DIVERGENCE_TITLES``."""
    sets = {"forget": scenario.forget, "remain": scenario.remain, "test": scenario.test}
    result = {}
    for name, (x, _) in sets.items():
        if len(x) == 0:
            result[f"kl_{name}"] = result[f"js_{name}"] = float("nan")
            continue
        kl, js = output_divergences(model, reference, x)
        result[f"kl_{name}"], result[f"js_{name}"] = float(kl.mean()), float(js.mean())
    result["tow"] = tug_of_war(model, reference, sets.values())
    return {key: result[key] for key in DIVERGENCE_TITLES}
