"""Per-example membership inference with shadow models: a U-LiRA-style attack.

The population attacks in ``metrics.py`` learn one threshold for all samples. Hayes et al.
(2024, "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of
Privacy") show that this overstates how well inexact unlearning works, and evaluate it with
U-LiRA, a per-example likelihood-ratio attack built on LiRA (Carlini et al. 2022,
"Membership Inference Attacks From First Principles"):

1. **Shadow models** (LiRA's online variant): ``shadows`` models are
   trained with the harness's own recipe (``recipes.train``, with ``epochs`` configurable
   and short) on random halves of a candidate pool, here the whole training set. The halves
   are balanced so that every sample is IN exactly half of the shadows and OUT of the other
   half (as in the LiRA code's inclusion matrix).
2. **Per-example statistic**: the logit-scaled confidence of the true label,
   ``phi = log(p / (1 - p))`` (Carlini et al.'s logit scaling), computed stably as
   ``log p_y - logsumexp_{c != y} log p_c``.
3. **Per-example Gaussians**: for each target, the mean of phi over the shadows that
   trained on it (IN) and over those that did not (OUT). With few shadows the per-example
   variance is too noisy, so by default one global variance per side is used (LiRA's
   "fixed variance", which Carlini et al. recommend when there are few shadows).
4. **Score**: the log-likelihood ratio ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)``
   of the attacked model's phi; > 0 means "more likely trained on it".

The unlearning game (after Hayes et al.): given the forget-set targets, tell the unlearned
model from the model retrained without them. ``distinguish`` reports the AUC and the best
balanced accuracy of separating the unlearned model's scores from the retrained model's on
the same targets: 0.5 means the attack cannot tell them apart (the ideal), 1.0 (or 0.0 for
AUC, over-unlearning) means it always can. ``member_rate`` is the share of forget targets
the attack calls members (score > 0).

Deviation from U-LiRA proper: Hayes et al. also *unlearn* each shadow model with the method
under test, so the IN distribution is "trained, then unlearned". That costs one run of every
method per shadow; here the IN side is "trained with the sample" (the original model's
distribution) and the OUT side "trained without it" (the retrained model's), which is
LiRA's test applied to unlearned models. The attack is most meaningful for random-sample
forgetting; for full-class forgetting a shadow that is OUT for a forgotten sample still saw
half of its class, so the retrained model (which saw none) lies outside both Gaussians.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unsc_fast.evaluation.methods.training_loop import reset_parameters
from unsc_fast.evaluation.recipes import train
from unsc_fast.training import Progress, predict_logits

# key -> column title, in table order
MEMBERSHIP_TITLES = {
    "ulira_members": "U-LiRA members",
    "ulira_auc": "U-LiRA AUC",
    "ulira_accuracy": "U-LiRA acc",
}


@dataclass
class ShadowSettings:
    """How the shadow models are trained (the attack is on when a comparison gets one of these)."""

    shadows: int = 8
    epochs: int = 10
    fixed_variance: bool = True
    seed: int = 0


DEFAULT_SHADOWS = 8  # on the embedded datasets: eight shadow trainings take about a minute on one CPU core


def settings_from_arguments(args) -> ShadowSettings | None:
    """``unsc-fast compare --ulira-shadows N [--ulira-epochs E]``: None (the attack off) for N = 0.

    Without ``--ulira-shadows`` the attack runs with ``DEFAULT_SHADOWS`` shadows where it is
    both meaningful and cheap: random-sample forgetting (in full-class forgetting every
    shadow still sees half of the forgotten class) on the embedded datasets (digits,
    MNIST-1D). Shadows train on half the data, so by default they get twice the original's
    epochs, i.e. about as many optimisation steps: a shadow trained less than the attacked
    model is a weaker reference and makes the attack look weaker than it is.
    """
    shadows = getattr(args, "ulira_shadows", None)
    if shadows is None:
        embedded = getattr(args, "data", None) is None and getattr(args, "dataset", None) in (None, "digits", "mnist1d")
        shadows = DEFAULT_SHADOWS if embedded and getattr(args, "scenario", "") == "random-sample" else 0
    if shadows <= 0:
        return None
    epochs = getattr(args, "ulira_epochs", None) or 2 * args.train_epochs
    return ShadowSettings(shadows=shadows, epochs=epochs)


def train_on_halves(make_model, x: torch.Tensor, y: torch.Tensor, inside: np.ndarray, epochs: int, seed: int,
                    progress: Progress | None = None, what: str = "shadows"):
    """Yield ``(shadow, model)`` for each row of ``inside`` (``inclusion_matrix``): a model from
    ``make_model()`` (built after seeding with ``seed * 1000 + shadow``: its initial weights are
    part of the estimate) trained ``epochs`` epochs on the samples that row marks IN. Shared by
    the U-LiRA attack and the memorisation estimate (``memorisation.py``)."""
    for shadow in range(len(inside)):
        shadow_seed = seed * 1000 + shadow
        torch.manual_seed(shadow_seed)
        model = make_model()
        keep = torch.from_numpy(inside[shadow])
        train(model, x[keep], y[keep], epochs=epochs, seed=shadow_seed)
        yield shadow, model
        if progress is not None:
            progress(f"{what}: shadow model {shadow + 1}/{len(inside)} trained")


def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) per sample, computed from log-softmax without cancellation."""
    log_p = predict_logits(model, x).double().cpu().log_softmax(1)
    y = y.cpu()
    own = log_p[torch.arange(len(y)), y]
    others = log_p.clone()
    others[torch.arange(len(y)), y] = float("-inf")
    return (own - torch.logsumexp(others, dim=1)).numpy()


def inclusion_matrix(samples: int, shadows: int, seed: int = 0) -> np.ndarray:
    """(shadows, samples) booleans: each sample is IN exactly ``shadows // 2`` shadows (random which)."""
    if shadows < 2 or shadows % 2:
        raise ValueError(f"the attack needs an even number of at least 2 shadow models, got {shadows}")
    rng = np.random.default_rng(seed)
    ranks = rng.random((shadows, samples)).argsort(0).argsort(0)
    return ranks < shadows // 2


@dataclass
class ShadowStatistics:
    """Per-target Gaussian parameters of phi for the IN and OUT shadows."""

    mean_in: np.ndarray
    mean_out: np.ndarray
    std_in: np.ndarray
    std_out: np.ndarray

    @classmethod
    def fit(cls, phi: np.ndarray, inside: np.ndarray, fixed_variance: bool = True) -> "ShadowStatistics":
        """``phi`` and ``inside`` are (shadows, targets); every target needs IN and OUT shadows."""
        if not (inside.any(0).all() and (~inside).any(0).all()):
            raise ValueError("every target needs at least one IN and one OUT shadow model")
        phi_in = np.where(inside, phi, np.nan)
        phi_out = np.where(inside, np.nan, phi)
        mean_in, mean_out = np.nanmean(phi_in, 0), np.nanmean(phi_out, 0)
        if fixed_variance:
            std_in = np.full_like(mean_in, np.nanstd(phi_in - mean_in))
            std_out = np.full_like(mean_out, np.nanstd(phi_out - mean_out))
        else:
            std_in, std_out = np.nanstd(phi_in, 0), np.nanstd(phi_out, 0)
        floor = 1e-6
        return cls(mean_in, mean_out, np.maximum(std_in, floor), np.maximum(std_out, floor))

    def log_likelihood_ratio(self, phi: np.ndarray) -> np.ndarray:
        """log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out), per target."""
        def log_normal(value, mean, std):
            return -0.5 * ((value - mean) / std) ** 2 - np.log(std)
        return log_normal(phi, self.mean_in, self.std_in) - log_normal(phi, self.mean_out, self.std_out)


def distinguish(scores: np.ndarray, reference_scores: np.ndarray) -> dict:
    """AUC and best balanced accuracy of telling ``scores`` (positives) from ``reference_scores``.

    The accuracy is maximised over thresholds and over the direction of the test, so it is
    in [0.5, 1]; the AUC keeps its direction (below 0.5: the model looks *less* like a
    member than the retrained one, e.g. over-unlearning).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.concatenate([np.ones(len(scores)), np.zeros(len(reference_scores))])
    values = np.concatenate([scores, reference_scores])
    if len(scores) == 0 or len(reference_scores) == 0 or not np.isfinite(values).all():
        return {"auc": float("nan"), "accuracy": float("nan")}  # nothing to score, or a model that diverged
    if np.allclose(scores, reference_scores) and len(scores) == len(reference_scores):
        return {"auc": 0.5, "accuracy": 0.5}
    false_positive, true_positive, _ = roc_curve(labels, values)
    balanced = 0.5 * (true_positive + 1.0 - false_positive)
    return {"auc": float(roc_auc_score(labels, values)), "accuracy": float(np.maximum(balanced, 1.0 - balanced).max())}


class ULiRA:
    """The attack against one deletion request: shadows trained once, any model scored after.

        attack = ULiRA.train_shadows(original, scenario, ShadowSettings(shadows=8, epochs=10))
        attack.evaluate(unlearned_model, retrained_model)  # {"ulira_members": .., "ulira_auc": .., ...}
    """

    def __init__(self, statistics: ShadowStatistics, targets) -> None:
        self.statistics = statistics
        self.targets = targets

    @classmethod
    def train_shadows(cls, template: nn.Module, scenario, settings: ShadowSettings = ShadowSettings(),
                      progress: Progress | None = None) -> "ULiRA":
        """Train ``settings.shadows`` fresh copies of ``template``'s architecture on balanced
        random halves of the whole training set; keep phi of the forget targets per shadow."""
        x_pool, y_pool = scenario.split.x_train, scenario.split.y_train
        targets = scenario.forget
        target_index = torch.nonzero(scenario.forget_train_mask).flatten().numpy()
        inside = inclusion_matrix(len(y_pool), settings.shadows, settings.seed)
        phi = np.empty((settings.shadows, len(target_index)))
        shadows = train_on_halves(lambda: reset_parameters(copy.deepcopy(template)), x_pool, y_pool, inside,
                                  settings.epochs, settings.seed, progress, "u-lira")
        for shadow, model in shadows:
            phi[shadow] = logit_confidence(model, *targets)
        statistics = ShadowStatistics.fit(phi, inside[:, target_index], settings.fixed_variance)
        return cls(statistics, targets)

    def scores(self, model: nn.Module) -> np.ndarray:
        """The log-likelihood ratio of every forget target under ``model``."""
        return self.statistics.log_likelihood_ratio(logit_confidence(model, *self.targets))

    def evaluate(self, model: nn.Module, reference: nn.Module) -> dict:
        """Member rate (%) of ``model`` on the forget targets and how well the attack tells it
        from ``reference`` (the retrained model): keys as in ``MEMBERSHIP_TITLES``."""
        scores = self.scores(model)
        game = distinguish(scores, self.scores(reference))
        members = 100.0 * float((scores > 0).mean()) if len(scores) and np.isfinite(scores).all() else float("nan")
        return {"ulira_members": members,
                "ulira_auc": game["auc"], "ulira_accuracy": game["accuracy"]}
