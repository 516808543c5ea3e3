"""Every comparison metric against a case small enough to compute by hand.

``Lookup`` is a model whose "images" are row numbers into a table of preset logits, so
each test decides exactly what the model predicts for every sample.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from unsc_fast.evaluation.data import DatasetSplit
from unsc_fast.evaluation.metrics import (
    accuracy,
    METRIC_TITLES,
    gap_to_reference,
    loss_entropy_membership_inference,
    membership_inference,
    per_class_accuracy,
    per_sample_loss,
    prediction_entropy,
    true_label_confidence,
    unlearning_metrics,
)
from unsc_fast.evaluation.scenario import full_class, random_sample



class Lookup(nn.Module):
    """forward(x) = logits[x[:, 0]]: sample i's input is its row number."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))
        self.unused = nn.Linear(1, 1)  # so the model has a parameter, like any real one

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def rows(start, stop):
    return torch.arange(start, stop, dtype=torch.float32)[:, None]


def predicting(classes, num_classes):
    """Logits whose argmax is ``classes[i]`` for row i (confident: 10 against 0)."""
    logits = torch.zeros(len(classes), num_classes)
    logits[torch.arange(len(classes)), torch.as_tensor(classes)] = 10.0
    return logits


# --------------------------------------------------------------------------- accuracies


@pytest.fixture
def hand_scenario():
    """3 classes, class 2 forgotten. Rows 0-5 are the training set, rows 6-9 the test set.

    train labels 0 0 1 1 2 2, predicted 0 1 1 1 2 0 -> remain 3/4 right, forget 1/2 right
    test  labels 0 1 2 2,     predicted 0 2 2 2     -> remain 1/2 right, forget 2/2 right
    """
    y_train, y_test = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 2])
    model = Lookup(predicting([0, 1, 1, 1, 2, 0] + [0, 2, 2, 2], 3))
    split = DatasetSplit(rows(0, 6), y_train, rows(6, 10), y_test, num_classes=3)
    return model, full_class(split, [2])


def test_accuracy_splits_by_hand(hand_scenario):
    model, scenario = hand_scenario
    metrics = unlearning_metrics(model, scenario)
    assert metrics["acc_remain_train"] == pytest.approx(75.0)
    assert metrics["acc_forget_train"] == pytest.approx(50.0)
    assert metrics["acc_remain_test"] == pytest.approx(50.0)
    assert metrics["acc_forget_test"] == pytest.approx(100.0)
    # per class on the test set: class 0 1/1, class 1 0/1 (predicted 2), class 2 2/2
    assert metrics["per_class_test"] == pytest.approx([100.0, 0.0, 100.0])
    assert set(METRIC_TITLES) <= set(metrics)


def test_random_sample_forgetting_has_no_forget_test_accuracy(hand_scenario):
    model, scenario = hand_scenario
    sampled = random_sample(scenario.split, 0.5, seed=0)
    metrics = unlearning_metrics(model, sampled)
    assert math.isnan(metrics["acc_forget_test"])
    assert metrics["acc_remain_test"] == pytest.approx(75.0)  # the whole test set: 3 of 4 right
    forget = sampled.forget_train_mask
    right = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert metrics["acc_forget_train"] == pytest.approx(100.0 * right[forget].float().mean().item())
    assert metrics["acc_remain_train"] == pytest.approx(100.0 * right[~forget].float().mean().item())
    assert math.isnan(accuracy(model, rows(0, 0), torch.zeros(0, dtype=torch.long)))  # empty set: undefined, not 0


def test_per_class_accuracy_with_a_missing_class_is_nan():
    # labels 0 0 0 1 1 3 (no class 2); predictions 0 0 1 1 0 3
    model = Lookup(predicting([0, 0, 1, 1, 0, 3], 4))
    scores = per_class_accuracy(model, rows(0, 6), torch.tensor([0, 0, 0, 1, 1, 3]), 4)
    assert scores[0] == pytest.approx(200 / 3)
    assert scores[1] == pytest.approx(50.0)
    assert math.isnan(scores[2])
    assert scores[3] == pytest.approx(100.0)
    assert all(math.isnan(score) for score in per_class_accuracy(model, rows(0, 0), torch.zeros(0, dtype=torch.long), 4))


# --------------------------------------------------------------------------- gaps


def test_gap_to_reference_by_hand_with_nan():
    metrics = dict(acc_remain_train=90.0, acc_forget_train=10.0, acc_remain_test=85.0, acc_forget_test=float("nan"),
                   mia_svc=30.0, mia_loss_entropy=40.0, mia_entropy_lr=60.0, per_class_test=[1.0])
    reference = dict(acc_remain_train=95.0, acc_forget_train=0.0, acc_remain_test=88.0, acc_forget_test=float("nan"),
                     mia_svc=20.0, mia_loss_entropy=50.0, mia_entropy_lr=70.0, per_class_test=[2.0])
    gaps = gap_to_reference(metrics, reference)
    assert gaps["acc_remain_train"] == 5.0 and gaps["acc_forget_train"] == 10.0 and gaps["acc_remain_test"] == 3.0
    assert gaps["mia_svc"] == 10.0 and gaps["mia_loss_entropy"] == 10.0
    assert math.isnan(gaps["acc_forget_test"])                    # undefined on both sides ...
    assert gaps["avg_gap"] == pytest.approx((5 + 10 + 3 + 10 + 10 + 10) / 6)  # ... and left out of the mean
    assert "per_class_test" not in gaps


def test_gap_to_reference_one_sided_nan_all_nan_and_chosen_keys():
    one_sided = gap_to_reference({"a": float("nan"), "b": 4.0}, {"a": 1.0, "b": 1.0}, keys=("a", "b"))
    assert math.isnan(one_sided["a"]) and one_sided["avg_gap"] == 3.0
    nothing = gap_to_reference({"a": float("nan")}, {"a": float("nan")}, keys=("a",))
    assert math.isnan(nothing["avg_gap"])
    assert gap_to_reference({"a": 2.0}, {"a": 2.0}, keys=("a",)) == {"a": 0.0, "avg_gap": 0.0}


# --------------------------------------------------------------------------- attack features


def test_confidence_loss_and_entropy_by_hand():
    # row 0: logits (0, ln 3) -> softmax (1/4, 3/4); row 1: uniform over 4 classes
    model = Lookup([[0.0, math.log(3.0), -1e9, -1e9], [0.0, 0.0, 0.0, 0.0]])
    x, y = rows(0, 2), torch.tensor([1, 2])
    assert true_label_confidence(model, x, y) == pytest.approx([0.75, 0.25])
    assert per_sample_loss(model, x, y) == pytest.approx([-math.log(0.75), math.log(4.0)], rel=1e-5)
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert prediction_entropy(model, x) == pytest.approx([expected_entropy, math.log(4.0)], rel=1e-5)


# --------------------------------------------------------------------------- membership inference


@pytest.fixture
def separable():
    """4 classes, 40 samples each of: members, non-members, member-like and non-member-like targets.

    Members (and member-like targets) get their true label with a margin of 8-12 (confidence
    > 0.99); non-members (and non-member-like targets) get it with a margin of -1 to 0.5
    (confidence below 0.5): the attack can tell them apart perfectly.
    """
    generator = torch.Generator().manual_seed(0)
    count, classes = 40, 4
    labels = torch.arange(4 * count) % classes
    margins = torch.cat([
        8 + 4 * torch.rand(count, generator=generator),      # members
        -1 + 1.5 * torch.rand(count, generator=generator),   # non-members
        8 + 4 * torch.rand(count, generator=generator),      # member-like targets
        -1 + 1.5 * torch.rand(count, generator=generator),   # non-member-like targets
    ])
    logits = torch.zeros(4 * count, classes)
    logits[torch.arange(4 * count), labels] = margins
    model = Lookup(logits)

    def part(index):
        return rows(index * count, (index + 1) * count), labels[index * count:(index + 1) * count]

    return model, part(0), part(1), part(2), part(3)


@pytest.mark.parametrize("attack", [membership_inference, loss_entropy_membership_inference])
def test_membership_inference_on_a_separable_case(separable, attack):
    model, members, nonmembers, member_like, nonmember_like = separable
    assert attack(model, members, nonmembers, member_like) == pytest.approx(100.0)
    assert attack(model, members, nonmembers, nonmember_like) == pytest.approx(0.0)
    # a target set of half of each: half called members
    mixed = tuple(torch.cat([a[:10], b[:10]]) for a, b in zip(member_like, nonmember_like))
    assert attack(model, members, nonmembers, mixed) == pytest.approx(50.0)


@pytest.mark.parametrize("attack", [membership_inference, loss_entropy_membership_inference])
def test_membership_inference_edge_cases(separable, attack):
    model, members, nonmembers, member_like, _ = separable
    empty = (rows(0, 0), torch.zeros(0, dtype=torch.long))
    assert math.isnan(attack(model, members, nonmembers, empty))
    with pytest.raises(ValueError, match="non-members"):
        attack(model, empty, nonmembers, member_like)
    # unequal member / non-member counts: trained on equally many of each, still separable
    assert attack(model, (members[0][:7], members[1][:7]), nonmembers, member_like) == pytest.approx(100.0)


def test_unlearning_metrics_attacks_use_remaining_train_as_members_and_test_as_non_members():
    """Remaining train rows confident, test rows unconfident: a forget set that looks like the
    remaining data scores 100, one that looks like the test data scores 0."""
    generator = torch.Generator().manual_seed(1)
    n_train, n_test = 60, 30
    y_train = torch.arange(n_train) % 3
    y_test = torch.arange(n_test) % 3
    split = DatasetSplit(rows(0, n_train), y_train, rows(n_train, n_train + n_test), y_test, num_classes=3)
    scenario = random_sample(split, 0.25, seed=0)

    def metrics_with(forget_margin_low, forget_margin_high):
        margins = torch.cat([8 + 4 * torch.rand(n_train, generator=generator),
                             -1 + 1.5 * torch.rand(n_test, generator=generator)])
        forget = scenario.forget_train_mask
        margins[:n_train][forget] = forget_margin_low + (forget_margin_high - forget_margin_low) * torch.rand(
            int(forget.sum()), generator=generator)
        labels = torch.cat([y_train, y_test])
        logits = torch.zeros(n_train + n_test, 3)
        logits[torch.arange(n_train + n_test), labels] = margins
        return unlearning_metrics(Lookup(logits), scenario)

    remembered = metrics_with(8, 12)
    assert remembered["mia_svc"] == pytest.approx(100.0) and remembered["mia_loss_entropy"] == pytest.approx(100.0)
    assert remembered["mia_entropy_lr"] == pytest.approx(100.0) and remembered["mia_svc_efficacy"] == pytest.approx(0.0)
    forgotten = metrics_with(-1, 0.5)
    assert forgotten["mia_svc"] == pytest.approx(0.0) and forgotten["mia_loss_entropy"] == pytest.approx(0.0)
    assert forgotten["mia_entropy_lr"] == pytest.approx(0.0) and forgotten["mia_svc_efficacy"] == pytest.approx(100.0)
    assert np.isclose(forgotten["acc_remain_train"], 100.0)


def test_entropy_attack_is_a_balanced_fit_on_all_members_and_non_members():
    """NatMU's attack: class_weight='balanced' on the full sets. 90 members with margins 1..5
    against 10 non-members with margins 0..2 (two-class logits [margin, 0]): an unbalanced fit
    calls a margin-1.3 target a member (the prior of 9:1 wins), the balanced one does not;
    a clearly confident target is a member either way."""
    from unsc_fast.evaluation.metrics import entropy_membership_inference

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    def logits(margins):
        return torch.stack([margins, torch.zeros_like(margins)], 1)

    g = torch.Generator().manual_seed(0)
    members = (logits(1 + 4 * torch.rand(90, generator=g)), torch.zeros(90, dtype=torch.long))
    nonmembers = (logits(2 * torch.rand(10, generator=g)), torch.zeros(10, dtype=torch.long))
    target = torch.zeros(5, dtype=torch.long)
    assert entropy_membership_inference(Fixed(), members, nonmembers, (logits(torch.full((5,), 1.3)), target)) == 0.0
    assert entropy_membership_inference(Fixed(), members, nonmembers, (logits(torch.full((5,), 4.0)), target)) == 100.0


def test_macro_accuracy_is_the_mean_over_present_classes():
    from unsc_fast.evaluation.metrics import macro_accuracy

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    # class 0: 9 samples all right; class 1: 1 sample wrong; micro 90 %, macro 50 %
    x = torch.tensor([[1.0, 0.0]] * 10)
    y = torch.tensor([0] * 9 + [1])
    assert macro_accuracy(Fixed(), x, y, 3) == pytest.approx(50.0)


def test_a_diverged_model_gets_nan_attacks_instead_of_stopping_the_run(hand_scenario):
    """A method that diverges (NaN outputs) must not crash the comparison in the attack's
    classifier: its attacks are NaN and the run records finite_outputs=False."""

    class Diverged(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), float("nan"))

    _, scenario = hand_scenario
    metrics = unlearning_metrics(Diverged(), scenario)
    assert metrics["finite_outputs"] is False
    assert math.isnan(metrics["mia_svc"]) and math.isnan(metrics["mia_entropy_lr"])
