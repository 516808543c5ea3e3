"""Metrics for comparing unlearned models: accuracy splits (micro and, as the official UNSC
code reports it, macro over classes), per-class accuracy, three membership-inference attacks, and the gap of each to the model retrained without the forget data.

The membership-inference attack follows the UNSC / SalUn code: a classifier learns to tell
members (remaining training data) from non-members (test data) by the model's confidence
on the true label, and is then asked about the forget set. A well-unlearned forget set
looks like non-members: a low score, close to the retrained model's.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from unsc_fast.training import predict_logits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if len(x) == 0:
        return float("nan")
    predictions = predict_logits(model, x).argmax(1)
    return 100.0 * (predictions == y.to(predictions.device)).float().mean().item()


def true_label_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Softmax probability the model gives each sample's true label."""
    probabilities = predict_logits(model, x).float().softmax(1).cpu()
    return probabilities[torch.arange(len(y)), y.cpu()].numpy()


def membership_inference(model, members, nonmembers, targets, *, seed: int = 0) -> float:
    """Percent of ``targets`` (x, y) that a confidence-feature SVC calls members.

    The SVC (RBF, C=3, as in the UNSC code) is trained on equally many ``members`` and
    ``nonmembers`` (each an (x, y) pair), so 50 means "cannot tell".
    """
    from sklearn.svm import SVC

    if len(targets[0]) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = min(len(members[0]), len(nonmembers[0]))
    if n == 0:
        raise ValueError("membership_inference needs members and non-members to train the attack")
    member_feature = true_label_confidence(model, *members)[rng.permutation(len(members[0]))[:n]]
    nonmember_feature = true_label_confidence(model, *nonmembers)[rng.permutation(len(nonmembers[0]))[:n]]
    features = np.concatenate([member_feature, nonmember_feature])[:, None]
    is_member = np.concatenate([np.ones(n), np.zeros(n)])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features, is_member)
    return 100.0 * float(attack.predict(true_label_confidence(model, *targets)[:, None]).mean())


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each sample under ``model`` (the loss a loss-based attack reads)."""
    logits = predict_logits(model, x).float().cpu()
    return torch.nn.functional.cross_entropy(logits, y.cpu(), reduction="none").numpy()


def prediction_entropy(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Shannon entropy (nats) of each sample's predicted distribution."""
    log_probabilities = predict_logits(model, x).float().cpu().log_softmax(1)
    return -(log_probabilities.exp() * log_probabilities).sum(1).numpy()


def loss_entropy_membership_inference(model, members, nonmembers, targets, *, seed: int = 0) -> float:
    """Percent of ``targets`` that a logistic regression on (loss, entropy) calls members.

    The second attack of the comparison: members are fitted better than non-members, so
    their loss and prediction entropy are lower (Yeom et al. 2018; Song & Mittal 2021).
    Trained like ``membership_inference``: equally many members and non-members; 50 means
    "cannot tell".
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(targets[0]) == 0:
        return float("nan")

    def features(x, y):
        return np.stack([per_sample_loss(model, x, y), prediction_entropy(model, x)], axis=1)

    rng = np.random.default_rng(seed)
    n = min(len(members[0]), len(nonmembers[0]))
    if n == 0:
        raise ValueError("the attack needs members and non-members to train on")
    member_features = features(*members)[rng.permutation(len(members[0]))[:n]]
    nonmember_features = features(*nonmembers)[rng.permutation(len(nonmembers[0]))[:n]]
    attack = make_pipeline(StandardScaler(), LogisticRegression())
    attack.fit(np.concatenate([member_features, nonmember_features]), np.concatenate([np.ones(n), np.zeros(n)]))
    return 100.0 * float(attack.predict(features(*targets)).mean())


def entropy_membership_inference(model, members, nonmembers, targets) -> float:
    """NatMU's attack as its authors run it (``class-wise/utils/mia.py``): a logistic regression
    with balanced class weights on the prediction entropy alone, fitted on *all* members
    (remaining-train) against *all* non-members (test), then the percent of ``targets`` it
    calls members. No subsampling and no scaling, hence no seed."""
    from sklearn.linear_model import LogisticRegression

    if len(targets[0]) == 0:
        return float("nan")
    if len(members[0]) == 0 or len(nonmembers[0]) == 0:
        raise ValueError("the attack needs members and non-members to train on")
    features = np.concatenate([prediction_entropy(model, members[0]), prediction_entropy(model, nonmembers[0])])
    is_member = np.concatenate([np.ones(len(members[0])), np.zeros(len(nonmembers[0]))])
    attack = LogisticRegression(class_weight="balanced", solver="lbfgs").fit(features[:, None], is_member)
    return 100.0 * float(attack.predict(prediction_entropy(model, targets[0])[:, None]).mean())


def macro_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean of the per-class accuracies over the classes present in ``y`` (the official UNSC
    code's ``test_by_class`` Acc_r); equals ``accuracy`` on balanced data."""
    scores = [s for s in per_class_accuracy(model, x, y, num_classes) if not np.isnan(s)]
    return float(np.mean(scores)) if scores else float("nan")


def per_class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 accuracy in percent for each class 0..num_classes-1 (NaN where a class has no sample)."""
    predictions = predict_logits(model, x).argmax(1).cpu() if len(x) else torch.empty(0, dtype=torch.long)
    y = y.cpu()
    scores = []
    for label in range(num_classes):
        of_class = y == label
        scores.append(100.0 * (predictions[of_class] == label).float().mean().item() if bool(of_class.any()) else float("nan"))
    return scores


# The scalar metrics of one unlearned model, in table order: key -> column title.
# ``mia_svc`` is the share of forget samples the confidence SVC calls members; the official
# UNSC code reports 100 minus it ("efficacy", ``agents/svc_mia.py`` with the forget set as
# ``target_test``), so both are shown, named apart.
METRIC_TITLES = {
    "acc_remain_train": "Acc_r train",
    "acc_forget_train": "Acc_f train",
    "acc_remain_test": "Acc_r test",
    "acc_remain_test_macro": "Acc_r test (macro)",
    "acc_forget_test": "Acc_f test",
    "mia_svc": "SVC-MIA member rate",
    "mia_svc_efficacy": "SVC-MIA efficacy",
    "mia_loss_entropy": "MIA loss+entropy LR",
    "mia_entropy_lr": "MIA entropy LR (NatMU)",
}
# The metrics ``avg_gap`` averages: efficacy and the macro accuracy restate other columns.
GAP_KEYS = ("acc_remain_train", "acc_forget_train", "acc_remain_test", "acc_forget_test", "mia_svc",
            "mia_loss_entropy", "mia_entropy_lr")


def unlearning_metrics(model: nn.Module, scenario, *, seed: int = 0) -> dict:
    """Every figure the comparison reports for ``model`` on a ``Scenario``.

    Accuracies on remaining/forget data (train and test), per-class test accuracy, and the
    membership attacks on the forget set, trained on remaining-train (members) versus the
    whole test set (non-members). A model whose outputs are NaN/Inf (a method that diverged)
    gets NaN attacks and ``finite_outputs=False`` instead of stopping the comparison.
    """
    remain, forget, test = scenario.remain, scenario.forget, scenario.test
    finite = all(bool(torch.isfinite(predict_logits(model, x)).all()) for x, _ in (remain, forget, test) if len(x))
    if finite:
        member_rate = membership_inference(model, remain, test, forget, seed=seed)
        loss_entropy = loss_entropy_membership_inference(model, remain, test, forget, seed=seed)
        entropy = entropy_membership_inference(model, remain, test, forget)
    else:  # a diverged model: its attacks are undefined, its accuracies say what happened
        member_rate = loss_entropy = entropy = float("nan")
    return {
        "finite_outputs": finite,
        "acc_remain_train": accuracy(model, *remain),
        "acc_forget_train": accuracy(model, *forget),
        "acc_remain_test": accuracy(model, *scenario.remain_test),
        "acc_remain_test_macro": macro_accuracy(model, *scenario.remain_test, scenario.num_classes),
        "acc_forget_test": accuracy(model, *scenario.forget_test),
        "mia_svc": member_rate,
        "mia_svc_efficacy": 100.0 - member_rate,
        "mia_loss_entropy": loss_entropy,
        "mia_entropy_lr": entropy,
        "per_class_test": per_class_accuracy(model, *test, scenario.num_classes),
    }


def gap_to_reference(metrics: dict, reference: dict, keys=GAP_KEYS) -> dict:
    """|metric - reference metric| for each scalar metric, plus their mean as ``avg_gap``.

    The reference is the model retrained without the forget data (the gold standard); a
    metric that is NaN on both sides (Acc_f test in random-sample forgetting) is skipped.
    """
    gaps = {key: abs(float(metrics[key]) - float(reference[key])) for key in keys}
    finite = [gap for gap in gaps.values() if not np.isnan(gap)]
    gaps["avg_gap"] = float(np.mean(finite)) if finite else float("nan")
    return gaps
