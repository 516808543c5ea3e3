"""Representation-level metrics: is the forgotten class gone from the features, not only from
the logits? (issue 27; protocols and sources in docs/metrics.md)

Lowering a forgotten class's output bias gives 0 % on it with every remaining prediction kept,
yet the features are the original's. Two measurements see through that:

* ``linear_probe``: a logistic regression on the inputs of the model's classifier layer (the
  last ``nn.Linear`` the forward pass calls, found with hooks, no model-specific code), fitted
  on the whole training split with the original labels; its accuracy on the forgotten classes'
  test samples says how much of them the features still tell apart (Alain & Bengio 2016).
* ``relearn_attack``: fine-tune a copy of the model on a few forget samples plus remaining
  samples, then measure the forgotten classes' test accuracy. A logit offset cannot fake it:
  the attack first fits a free per-class offset on the logits (a convex problem whose optimum
  does not depend on any offset the model carries), so a lowered bias is undone exactly.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.training import eval_mode, model_device, predict_logits

# the figures ``representation_metrics`` adds to a comparison: key -> column title
REPRESENTATION_TITLES = {
    "probe_forget": "probe Acc_f test",
    "probe_remain": "probe Acc_r test",
    "relearn_forget": "relearn Acc_f test",
}
# the ones whose gap to the retrained model makes up ``representation_gap``
REPRESENTATION_GAP_KEYS = ("probe_forget", "relearn_forget")


def classifier_layer(model: nn.Module, sample: torch.Tensor) -> tuple[str, nn.Linear]:
    """(name, module) of the last ``nn.Linear`` the forward pass calls on ``sample``, checked to
    produce one output per class (its output width is the model's)."""
    called: list[str] = []
    handles = [module.register_forward_hook(lambda *_, name=name: called.append(name))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        logits = predict_logits(model, sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ValueError(f"{type(model).__name__} calls no nn.Linear layer: the probe reads the inputs of the "
                         "classifier layer, the last nn.Linear of the forward pass")
    name = called[-1]
    layer = model.get_submodule(name)
    if layer.out_features != logits.shape[-1]:
        raise ValueError(f"the last nn.Linear called, {name!r}, gives {layer.out_features} outputs but the model "
                         f"{logits.shape[-1]}: it is not the classifier layer the probe reads")
    return name, layer


@torch.no_grad()
def classifier_inputs(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, d) float32 on the CPU: what the classifier layer receives for each sample (eval mode)."""
    name, layer = classifier_layer(model, x)
    chunks: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: chunks.append(inputs[0].detach()))
    device = model_device(model)
    try:
        with eval_mode(model):
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size].to(device))
    finally:
        handle.remove()
    features = torch.cat(chunks)
    if features.ndim != 2:
        raise ValueError(f"the classifier layer {name!r} receives inputs of shape {tuple(features.shape[1:])} per "
                         "sample; the probe needs one feature vector per sample")
    return features.float().cpu()


def probe_labels(scenario) -> tuple[torch.Tensor, torch.Tensor]:
    """(train labels, test labels) the probe learns and is scored against: the split's labels;
    in sub-class forgetting the forgotten fine label gets a class of its own (one past the
    coarse classes), so the probe asks whether the features still tell it from its sibling."""
    y_train, y_test = scenario.split.y_train.clone(), scenario.split.y_test.clone()
    if scenario.kind == "sub_class":
        y_train[scenario.forget_train_mask] = scenario.num_classes
        y_test[scenario.forget_test_mask] = scenario.num_classes
    return y_train, y_test


def linear_probe(model: nn.Module, scenario, *, regularisation: float = 1.0, max_iter: int = 2000) -> dict:
    """Probe accuracy (%) on the forgotten classes' test samples (``probe_forget``; NaN without a
    forget test set) and on the remaining ones (``probe_remain``).

    Standardised features, multinomial logistic regression (lbfgs, ``C=regularisation``), fitted
    on every training sample, forgotten ones included: a deterministic function of the model.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split = scenario.split
    y_train, y_test = probe_labels(scenario)
    train_features = classifier_inputs(model, split.x_train).numpy()
    test_features = classifier_inputs(model, split.x_test).numpy()
    if not (np.isfinite(train_features).all() and np.isfinite(test_features).all()):
        return {"probe_forget": float("nan"), "probe_remain": float("nan")}
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularisation, max_iter=max_iter, random_state=0))
    probe.fit(train_features, y_train.numpy())
    correct = probe.predict(test_features) == y_test.numpy()
    forget = scenario.forget_test_mask.numpy()
    return {"probe_forget": _percent(correct[forget]), "probe_remain": _percent(correct[~forget])}


def _percent(correct: np.ndarray) -> float:
    return 100.0 * float(correct.mean()) if len(correct) else float("nan")


def relearn_set(scenario, *, forget_per_label: int = 10, remain_total: int = 90, seed: int = 0):
    """(x, y) the attacker holds: ``forget_per_label`` forget samples of each label in the forget
    set and ``remain_total`` remaining samples spread evenly over the remaining labels (at least
    one of each), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x_forget, y_forget = scenario.forget
    x_remain, y_remain = scenario.remain
    chosen_forget = _per_label(y_forget, [forget_per_label] * len(y_forget.unique()), generator)
    labels = y_remain.unique()
    counts = [remain_total // len(labels) + (i < remain_total % len(labels)) for i in range(len(labels))]
    chosen_remain = _per_label(y_remain, [max(1, c) for c in counts], generator)
    return torch.cat([x_forget[chosen_forget], x_remain[chosen_remain]]), torch.cat([y_forget[chosen_forget],
                                                                                     y_remain[chosen_remain]])


def _per_label(labels: torch.Tensor, counts: list[int], generator: torch.Generator) -> torch.Tensor:
    """Indices: ``counts[i]`` random samples (or all there are) of the i-th label in sorted order."""
    chosen = []
    for label, count in zip(labels.unique(), counts):
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen)


def fit_logit_offsets(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
    """The per-class offset ``delta`` minimising cross-entropy(logits + delta, y).

    Started from minus each class's mean logit, so the start (and every L-BFGS iterate after it)
    is the same whatever constant a model adds to a class's logit: ``logits + delta`` does not
    depend on such an offset, however large. Classes absent from ``y`` are pushed down by at most
    ``max_iter`` iterations' worth (the optimum is then at -inf).
    """
    logits = logits.detach().double()
    delta = (-logits.mean(0)).clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([delta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(logits + delta, y)
        loss.backward()
        return loss

    optimiser.step(closure)
    return delta.detach().float()


def relearn_attack(model: nn.Module, scenario, *, seed: int = 0, draws: int = 3, steps: int = 10, lr: float = 1e-3,
                   fit_offsets: bool = True, forget_per_label: int = 10, remain_total: int = 90) -> float:
    """Forgotten-class test accuracy (%) after a relearning attack on a copy of ``model``, the
    mean over ``draws`` relearn sets (drawn with seeds ``seed``, ``seed + 1``, ...).

    The attacker holds ``relearn_set`` (10 forget samples per forgotten label + 90 remaining).
    With ``fit_offsets`` (the default) it first fits a free offset per class on the logits
    (``fit_logit_offsets``), then runs ``steps`` full-batch Adam steps (``lr``) on every
    parameter and the offsets; ``fit_offsets=False`` is the plain 10-step attack that a large
    lowered bias fools (Adam moves each weight ~``lr`` a step). BatchNorm statistics and dropout
    stay in eval mode. NaN without a forget test set (sample-wise requests).
    """
    if int(scenario.forget_test_mask.sum()) == 0:
        return float("nan")
    scores = [_relearn_once(model, scenario, seed + draw, steps, lr, fit_offsets, forget_per_label, remain_total)
              for draw in range(draws)]
    return float(np.mean(scores))


def _relearn_once(model, scenario, seed, steps, lr, fit_offsets, forget_per_label, remain_total) -> float:
    x, y = relearn_set(scenario, forget_per_label=forget_per_label, remain_total=remain_total, seed=seed)
    attacked = copy.deepcopy(model)
    device = model_device(attacked)
    x, y = x.to(device), y.to(device)
    logits = predict_logits(attacked, x).float()
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    delta = fit_logit_offsets(logits, y) if fit_offsets else torch.zeros(logits.shape[1], device=device)
    delta = delta.to(device).requires_grad_(fit_offsets)
    parameters = [p for p in attacked.parameters() if p.is_floating_point()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(parameters + ([delta] if fit_offsets else []), lr=lr)
    with torch.enable_grad(), eval_mode(attacked):
        for _ in range(steps):
            optimiser.zero_grad()
            F.cross_entropy(attacked(x).float() + delta, y).backward()
            optimiser.step()
    x_test, y_test = scenario.forget_test
    predictions = (predict_logits(attacked, x_test).float() + delta.detach()).argmax(1).cpu()
    return 100.0 * float((predictions == y_test.cpu()).float().mean())


def representation_metrics(model: nn.Module, scenario, *, seed: int = 0) -> dict:
    """The probe and the relearning attack (``REPRESENTATION_TITLES``) for one model."""
    return {**linear_probe(model, scenario), "relearn_forget": relearn_attack(model, scenario, seed=seed)}


def representation_gap(metrics: dict, reference: dict) -> dict:
    """|probe - retrained probe| and |relearn - retrained relearn| on the forgotten classes, and
    their mean ``representation_gap`` (NaN where undefined, e.g. sample-wise requests)."""
    gaps = {key: abs(float(metrics[key]) - float(reference[key])) for key in REPRESENTATION_GAP_KEYS}
    finite = [gap for gap in gaps.values() if not np.isnan(gap)]
    gaps["representation_gap"] = float(np.mean(finite)) if finite else float("nan")
    return gaps
