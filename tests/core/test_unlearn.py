"""The UNSC procedure end to end on the bundled digits, and its label rules."""
import copy

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.evaluation.data import class_mask, load_digits_split
from unsc_fast.evaluation.models import DigitsCNN
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.evaluation.recipes import train
from unsc_fast.calibration import calibrated_distribution, calibrated_labels, random_labels
from unsc_fast.unlearn import unlearn


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        return self.logits[: len(x)]


def test_calibrated_labels_pick_the_best_remaining_class():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [1.0, 9.0, 8.0, 7.0], [0.0, 0.0, 1.0, 2.0]])
    model = FixedLogits(logits)
    y = torch.tensor([0, 1, 3])
    # class-wise request for classes {1}: own label and every forgotten class are ruled out
    assert calibrated_labels(model, torch.zeros(3, 1), y, excluded_classes=[1]).tolist() == [2, 2, 2]
    # sample-wise: only the own label is ruled out (the "second best" rule)
    assert calibrated_labels(model, torch.zeros(3, 1), y).tolist() == [1, 2, 2]


def test_the_soft_calibration_is_the_original_distribution_over_the_allowed_classes():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [1.0, 9.0, 8.0, 7.0], [0.0, 0.0, 1.0, 2.0]])
    model = FixedLogits(logits)
    y = torch.tensor([0, 1, 3])
    soft = calibrated_distribution(model, torch.zeros(3, 1), y, excluded_classes=[1])
    allowed = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(soft == 0, ~allowed)  # own label and forgotten classes get nothing
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)
    assert torch.allclose(soft, expected, atol=0, rtol=1e-6) and torch.allclose(soft.sum(1), torch.ones(3))
    assert torch.equal(soft.argmax(1), calibrated_labels(model, torch.zeros(3, 1), y, excluded_classes=[1]))


def test_random_labels_avoid_own_and_forgotten_classes():
    y = torch.tensor([0, 1, 2] * 50)
    labels = random_labels(y, 5, excluded_classes=[1], generator=torch.Generator().manual_seed(0))
    assert not (labels == y).any() and not (labels == 1).any()
    assert set(labels.tolist()) == {0, 2, 3, 4}
    with pytest.raises(ValueError, match="no class is left"):
        random_labels(torch.tensor([0]), 2, excluded_classes=[1])


@pytest.fixture(scope="module")
def digits_model():
    split = load_digits_split(seed=0)
    torch.manual_seed(0)  # the initial weights must not depend on which tests ran before
    model = train(DigitsCNN(width=16), split.x_train, split.y_train, epochs=12, seed=0)
    return split, model


def class_accuracies(model, split, forget_class):
    forget_test = class_mask(split.y_test, [forget_class])
    return (
        accuracy(model, split.x_test[~forget_test], split.y_test[~forget_test]),
        accuracy(model, split.x_test[forget_test], split.y_test[forget_test]),
    )


@pytest.mark.parametrize("forget_class", [3, 8])
def test_unsc_forgets_the_class_and_keeps_the_rest(digits_model, forget_class):
    split, original = digits_model
    remain_before, forget_before = class_accuracies(original, split, forget_class)
    assert forget_before > 85 and remain_before > 95
    forget_train = class_mask(split.y_train, [forget_class])
    model = copy.deepcopy(original)
    result = unlearn(
        model,
        forget=(split.x_train[forget_train], split.y_train[forget_train]),
        remain=(split.x_train[~forget_train], split.y_train[~forget_train]),
        forget_classes=[forget_class],
        threshold=0.99,  # the mechanism at a tight subspace; the 0.97 default trades ~2 points here
    )
    remain_after, forget_after = class_accuracies(model, split, forget_class)
    # ~50 test images per class: "near 0" allows a few of them (over 6 initialisations
    # the worst seen was 3), against more than 85 % before
    assert forget_after < 8.0
    assert accuracy(model, split.x_train[forget_train], split.y_train[forget_train]) < 2.0
    assert remain_after >= remain_before - 1.5
    assert (result.labels[:, forget_class] == 0).all()  # soft targets: no mass on the forgotten class
    # BatchNorm statistics were not touched
    for (name, a), b in zip(model.named_buffers(), original.buffers()):
        if "running" in name:
            assert torch.equal(a, b), name

    # the ablation without projection damages the remaining classes far more
    unprojected = copy.deepcopy(original)
    plain = unlearn(
        unprojected,
        forget=(split.x_train[forget_train], split.y_train[forget_train]),
        forget_classes=[forget_class],
        project=False,
        calibrate=False,
    )
    assert class_accuracies(unprojected, split, forget_class)[0] < remain_after - 10
    assert plain.projector is None and all(check["threshold"] is None for check in plain.trajectory)  # no protection


def test_a_second_request_reuses_the_observed_projector(digits_model):
    split, original = digits_model
    model = copy.deepcopy(original)
    projector = NullSpaceProjector(model, threshold=0.99)
    from unsc_fast.training import make_loader

    projector.collect(make_loader(split.x_train, split.y_train, 256))
    for forget_class in (2, 5):
        forget_train = class_mask(split.y_train, [forget_class])
        result = unlearn(model, forget=(split.x_train[forget_train], split.y_train[forget_train]),
                         forget_classes=[forget_class], projector=projector)
        assert result.projector is projector and projector.built_from == tuple(
            c for c in range(10) if c != forget_class
        )
        assert class_accuracies(model, split, forget_class)[1] < 5.0


def test_sample_wise_request_is_refused_not_a_silent_no_op(digits_model):
    """Random samples of classes that stay: the remaining samples span the same inputs, so the
    projected fine-tuning could not move them; unlearn says so instead of returning the model
    untouched. A class-wise request on the same model passes the same check."""
    from unsc_fast.room import NoRoomError, selectivity

    split, original = digits_model
    model = copy.deepcopy(original)
    forget = torch.zeros(len(split.y_train), dtype=torch.bool)
    forget[torch.randperm(len(forget), generator=torch.Generator().manual_seed(0))[:100]] = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoRoomError, match="span the same layer inputs"):
        unlearn(model, forget=(split.x_train[forget], split.y_train[forget]),
                remain=(split.x_train[~forget], split.y_train[~forget]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # min_selectivity=0 runs it anyway (the caller asked for it)
    result = unlearn(model, forget=(split.x_train[forget], split.y_train[forget]),
                     remain=(split.x_train[~forget], split.y_train[~forget]), min_selectivity=0, epochs=1)
    assert (result.labels.gather(1, split.y_train[forget][:, None]) == 0).all()  # nor on a sample's own label

    projector = NullSpaceProjector(original, threshold=0.99)
    from unsc_fast.training import make_loader

    projector.collect(make_loader(split.x_train, split.y_train, 256))
    projector.build(exclude=[3])
    ratios = selectivity(original, projector, split.x_train[class_mask(split.y_train, [3])])
    assert max(ratios.values()) > 2.0


def test_unlearn_argument_errors(digits_model):
    split, original = digits_model
    model = copy.deepcopy(original)
    with pytest.raises(ValueError, match="empty"):
        unlearn(model, forget=(split.x_train[:0], split.y_train[:0]))
    with pytest.raises(ValueError, match="differ in length"):
        unlearn(model, forget=(split.x_train[:3], split.y_train[:2]))
    with pytest.raises(ValueError, match="remain="):
        unlearn(model, forget=(split.x_train[:3], split.y_train[:3]))


def test_official_preset_sets_plain_sgd_and_the_class_by_class_basis(digits_model, monkeypatch):
    from unsc_fast import unlearn as unlearn_module
    from unsc_fast.solve.incremental import class_thresholds

    split, original = digits_model
    model = copy.deepcopy(original)
    seen = {}
    real_sgd = torch.optim.SGD

    def recording_sgd(params, lr, momentum, weight_decay=0.0):
        seen.update(lr=lr, momentum=momentum, weight_decay=weight_decay)
        return real_sgd(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    monkeypatch.setattr(unlearn_module.torch.optim, "SGD", recording_sgd)
    forget = class_mask(split.y_train, [3])
    result = unlearn(model, (split.x_train[forget], split.y_train[forget]), (split.x_train[~forget], split.y_train[~forget]),
                     forget_classes=[3], preset="official", epochs=1)
    assert seen == {"lr": 0.04, "momentum": 0.0, "weight_decay": 0.0}
    assert result.labels.dim() == 1 and not (result.labels == 3).any()  # the official rule: hard calibrated labels
    assert result.stop_reason == "budget" and result.epochs == 1  # no stop rule: exactly the epochs asked for
    kept = tuple(c for c in range(10) if c != 3)
    assert result.projector.built_from == kept
    assert result.projector.built_threshold == pytest.approx(max(class_thresholds(list(kept), None)))
    ranks = dict(result.projector.ranks())
    assert ranks != dict(result.projector.build(threshold=0.99).ranks())  # not the one-shot energy basis
    with pytest.raises(ValueError, match="preset"):
        unlearn(model, (split.x_train[forget], split.y_train[forget]), preset="fastest")


def test_default_run_reports_what_it_used_and_why_it_stopped(digits_model):
    """The default: per-label protection adapted to the request, a stop rule, a held-out forget
    slice, a guard; every weight change lies in the null space of the lowest protection level the
    run used (the per-label bases of one request are nested)."""
    split, original = digits_model
    model = copy.deepcopy(original)
    forget = class_mask(split.y_train, [8])
    tracked_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() > 1}
    result = unlearn(model, (split.x_train[forget], split.y_train[forget]), (split.x_train[~forget], split.y_train[~forget]),
                     forget_classes=[8])
    assert result.stop_reason == "forgotten"
    assert result.protection["criterion"] == "per_label" and result.protection["levels"][0] == 0.99
    assert result.steps > 0 and result.trajectory and result.trajectory[-1]["event"] == "forgotten"
    assert result.trajectory[-1]["forget"] == 0.0 and result.trajectory[-1]["features"] is not None
    assert result.holdout is not None and 0 < int(result.holdout.sum()) < int(forget.sum()) // 3
    kept = split.y_train[~forget]
    assert result.guard == f"remain slice, {sum(round(0.1 * int((kept == c).sum())) for c in kept.unique())} samples"
    assert result.labels.shape == (int(forget.sum()), 10) and (result.labels[:, 8] == 0).all()
    remain_after, forget_after = class_accuracies(model, split, 8)
    assert forget_after < 8.0 and remain_after >= class_accuracies(original, split, 8)[0] - 1.5
    projector = result.projector
    projector.build(threshold=min(result.protection["levels"]), criterion="per_label")  # class 8 was never observed
    for name, param in model.named_parameters():
        if param in projector.protection.uses and name in tracked_before:
            change = (param.detach() - tracked_before[name]).double()
            if float(change.norm()) > 0:
                assert projector.residual(param, change) < 1e-5, name


def test_the_result_names_the_guard_it_was_given_or_none(digits_model):
    split, original = digits_model
    forget = class_mask(split.y_train, [8])
    data = (split.x_train[forget], split.y_train[forget])
    held = (split.x_test[split.y_test != 8], split.y_test[split.y_test != 8])
    given = unlearn(copy.deepcopy(original), data, (split.x_train[~forget], split.y_train[~forget]), forget_classes=[8],
                    guard=held, epochs=1)
    assert given.guard == f"given, {len(held[1])} samples"
    fixed = unlearn(copy.deepcopy(original), data, (split.x_train[~forget], split.y_train[~forget]), forget_classes=[8],
                    stop=None, epochs=1)
    assert fixed.guard == "none"  # exactly the epochs asked for: nothing measured


def test_a_whole_validation_set_as_guard_reports_its_forgotten_class_and_is_not_damaged_by_it(digits_model):
    """Samples of the forgotten class in ``guard=`` are not damage when they are forgotten: they
    are left out of the guard and reported at every check (``unseen``), not a stop condition."""
    split, original = digits_model
    forget = class_mask(split.y_train, [8])
    model = copy.deepcopy(original)
    result = unlearn(model, (split.x_train[forget], split.y_train[forget]), (split.x_train[~forget], split.y_train[~forget]),
                     forget_classes=[8], guard=(split.x_test, split.y_test))
    held_forget = split.y_test == 8
    assert result.guard == f"given, {int((~held_forget).sum())} samples; {int(held_forget.sum())} of the forgotten classes reported"
    assert result.stop_reason != "guard"  # forgotten, or its budget spent driving the last 8s below the confidence
    assert all(abs(check["guard_damage"]) < 3.0 for check in result.trajectory)  # a class of ten would read ~10
    assert result.trajectory[-1]["unseen"] == accuracy(model, split.x_test[held_forget], split.y_test[held_forget])
    assert result.trajectory[0]["unseen"] > 50.0  # measured from the first check on


def test_the_same_call_gives_the_same_model_whatever_the_global_random_state(digits_model):
    split, original = digits_model
    forget = class_mask(split.y_train, [5])
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = copy.deepcopy(original)
        unlearn(model, (split.x_train[forget], split.y_train[forget]), (split.x_train[~forget], split.y_train[~forget]),
                forget_classes=[5], epochs=3)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
