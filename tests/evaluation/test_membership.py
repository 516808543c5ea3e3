"""The per-example (U-LiRA-style) membership attack: its pieces by hand, then the whole attack
on a small digits problem, where it must tell a model that still holds the forget set from
the retrained one, and must not tell the retrained one from itself."""
import copy
import math

import numpy as np
import pytest
import torch

from unsc_fast.evaluation.data import DatasetSplit, load_digits_split
from unsc_fast.evaluation.membership import (
    MEMBERSHIP_TITLES,
    ShadowSettings,
    ShadowStatistics,
    ULiRA,
    distinguish,
    inclusion_matrix,
    logit_confidence,
)
from unsc_fast.evaluation.methods import get_method
from unsc_fast.evaluation.models import DigitsCNN
from unsc_fast.evaluation.recipes import train
from unsc_fast.evaluation.scenario import make_scenario


from evaluation_helpers import Lookup, per_class as _per_class  # noqa: E402


def test_logit_confidence_is_log_p_over_one_minus_p():
    probabilities = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3]])
    model = Lookup(probabilities.log())
    phi = logit_confidence(model, torch.tensor([[0.0], [1.0]]), torch.tensor([0, 2]))
    assert phi == pytest.approx([math.log(0.8 / 0.2), math.log(0.3 / 0.7)], rel=1e-5)
    # stays finite and large where 1 - p underflows in float32
    sure = logit_confidence(Lookup(torch.tensor([[40.0, 0.0]])), torch.tensor([[0.0]]), torch.tensor([0]))
    assert sure[0] == pytest.approx(40.0, rel=1e-6)


def test_inclusion_matrix_puts_every_sample_in_exactly_half_of_the_shadows():
    inside = inclusion_matrix(101, 8, seed=3)
    assert inside.shape == (8, 101) and (inside.sum(0) == 4).all()
    assert not (inside == inclusion_matrix(101, 8, seed=4)).all()
    # every shadow trains on about half the pool, not on a fixed half
    assert 30 < inside.sum(1).min() and inside.sum(1).max() < 70
    with pytest.raises(ValueError, match="even number"):
        inclusion_matrix(10, 5)


def test_likelihood_ratio_of_per_example_gaussians():
    inside = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    phi = np.array([[5.0, 1.0], [7.0, -1.0], [1.0, 9.0], [-1.0, 11.0]])
    stats = ShadowStatistics.fit(phi, inside, fixed_variance=False)
    assert stats.mean_in == pytest.approx([6.0, 10.0]) and stats.mean_out == pytest.approx([0.0, 0.0])
    assert stats.std_in == pytest.approx([1.0, 1.0]) and stats.std_out == pytest.approx([1.0, 1.0])
    # log N(x; 6, 1) - log N(x; 0, 1) = (x^2 - (x - 6)^2) / 2
    assert stats.log_likelihood_ratio(np.array([6.0, 0.0])) == pytest.approx([18.0, -50.0])
    fixed = ShadowStatistics.fit(phi, inside, fixed_variance=True)
    assert fixed.std_in == pytest.approx([1.0, 1.0])  # one pooled std per side
    with pytest.raises(ValueError, match="IN and one OUT"):
        ShadowStatistics.fit(phi, np.ones_like(inside), fixed_variance=True)


def test_distinguish_reports_auc_and_best_balanced_accuracy():
    assert distinguish(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == {"auc": 0.5, "accuracy": 0.5}
    separated = distinguish(np.array([5.0, 6.0, 7.0]), np.array([0.0, 1.0, 2.0]))
    assert separated == {"auc": 1.0, "accuracy": 1.0}
    reversed_ = distinguish(np.array([0.0, 1.0, 2.0]), np.array([5.0, 6.0, 7.0]))
    assert reversed_["auc"] == 0.0 and reversed_["accuracy"] == 1.0  # telling them apart, either way round
    half = distinguish(np.array([1.0, 3.0]), np.array([0.0, 2.0]))
    assert half["auc"] == pytest.approx(0.75) and half["accuracy"] == pytest.approx(0.75)


def test_a_model_that_diverged_gets_nan_figures_instead_of_stopping_the_run():
    """Seen on MNIST-1D: gradient ascent's NaN outputs reached roc_curve, which raised."""
    assert all(math.isnan(v) for v in distinguish(np.array([np.nan, 1.0]), np.array([0.0, 1.0])).values())
    phi = np.array([[1.0, 2.0], [3.0, 4.0]])
    statistics = ShadowStatistics.fit(phi, np.array([[True, False], [False, True]]))
    attack = ULiRA(statistics, (torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1])))
    diverged = Lookup([[float("nan"), 0.0], [0.0, float("nan")]])
    figures = attack.evaluate(diverged, Lookup([[2.0, 0.0], [0.0, 2.0]]))
    assert list(figures) == list(MEMBERSHIP_TITLES) and all(math.isnan(v) for v in figures.values())


@pytest.mark.slow  # 8 shadow models and two more: about 10 s of CPU
def test_ulira_tells_a_model_that_kept_the_forget_set_from_the_retrained_one():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digits = load_digits_split(seed=0)
        split = DatasetSplit(*_per_class(digits.x_train, digits.y_train, 30),
                             *_per_class(digits.x_test, digits.y_test, 10), num_classes=10)
        scenario = make_scenario(split, "random_sample", forget_fraction=0.2, seed=0)
        torch.manual_seed(0)
        original = train(DigitsCNN(width=8), split.x_train, split.y_train, epochs=15, seed=0)
        retrained = get_method("retrain")(original, scenario, {"epochs": 15}, seed=0).model
        # shadows see half the data, so twice the epochs give them the original's number of steps
        attack = ULiRA.train_shadows(original, scenario, ShadowSettings(shadows=8, epochs=30, seed=0))
        kept = attack.evaluate(original, retrained)
        assert list(kept) == list(MEMBERSHIP_TITLES)
        assert kept["ulira_auc"] > 0.75 and kept["ulira_accuracy"] > 0.7
        gone = attack.evaluate(retrained, retrained)
        assert gone["ulira_auc"] == 0.5 and gone["ulira_accuracy"] == 0.5
        assert kept["ulira_members"] > gone["ulira_members"] + 30
        # the shadows are fresh models of the same architecture: the template is not touched
        assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(),
                                                     copy.deepcopy(original).state_dict().values()))
    finally:
        torch.set_num_threads(threads)


def test_the_compare_command_line_turns_the_attack_on_and_off():
    from unsc_fast.evaluation.cli import build_parser
    from unsc_fast.evaluation.membership import settings_from_arguments

    parser = build_parser()
    assert settings_from_arguments(parser.parse_args(["compare"])) is None
    on = settings_from_arguments(parser.parse_args(["compare", "--ulira-shadows", "8", "--train-epochs", "12"]))
    assert on == ShadowSettings(shadows=8, epochs=24)  # shadows see half the data: twice the epochs
    short = settings_from_arguments(parser.parse_args(["compare", "--ulira-shadows", "4", "--ulira-epochs", "3"]))
    assert short.shadows == 4 and short.epochs == 3
    # on by default where it is meaningful and cheap: random-sample forgetting on the embedded datasets
    for dataset in ([], ["--dataset", "digits"], ["--dataset", "mnist1d"]):
        default = settings_from_arguments(parser.parse_args(["compare", "--scenario", "random-sample", *dataset]))
        assert default == ShadowSettings(shadows=8, epochs=60), dataset
    assert settings_from_arguments(parser.parse_args(["compare", "--scenario", "random-sample", "--ulira-shadows", "0"])) is None
    assert settings_from_arguments(parser.parse_args(["compare", "--scenario", "random-sample", "--dataset", "cifar10",
                                                      "--data-root", "x"])) is None  # a full training per shadow
    assert settings_from_arguments(parser.parse_args(["compare", "--scenario", "random-sample", "--data", "x"])) is None


@pytest.mark.slow  # a whole (tiny) comparison with the attack: about 10 s
def test_run_comparison_scores_every_model_with_the_attack():
    from unsc_fast.evaluation.compare import CompareConfig, run_comparison
    from unsc_fast.evaluation.report import format_report

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = CompareConfig(scenario="random_sample", methods=("retrain", "ssd"), seeds=(0,), train_epochs=2)
        results = run_comparison(config, None, ShadowSettings(shadows=2, epochs=2))
    finally:
        torch.set_num_threads(threads)
    assert results["membership_titles"] == MEMBERSHIP_TITLES and results["membership"]["shadows"] == 2
    for name in ("retrain", "ssd", "original"):
        metrics = results["runs"][name][0]["metrics"]
        assert set(MEMBERSHIP_TITLES) <= set(metrics), name
        assert 0.0 <= metrics["ulira_auc"] <= 1.0 and 0.5 <= metrics["ulira_accuracy"] <= 1.0
    assert results["runs"]["retrain"][0]["metrics"]["ulira_auc"] == 0.5
    report = format_report(results)
    assert "| U-LiRA AUC |" in report.splitlines()[4] and "U-LiRA members" in report
