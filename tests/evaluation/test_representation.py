"""The representation-level metrics (linear probe, relearning attack) and the logit_suppression
baseline, on tiny synthetic data: ten Gaussian classes in 8 dimensions and a small MLP."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from unsc_fast.evaluation.data import DatasetSplit
from unsc_fast.evaluation.methods import UnsupportedScenario, get_method
from unsc_fast.evaluation.methods.logit_suppression import suppression_shift
from unsc_fast.evaluation.recipes import train
from unsc_fast.evaluation.representation import (
    classifier_inputs,
    classifier_layer,
    fit_logit_offsets,
    linear_probe,
    probe_labels,
    relearn_attack,
    relearn_set,
    representation_gap,
)
from unsc_fast.evaluation.scenario import full_class, random_sample
from unsc_fast.training import predict_logits


def blobs(per_class: int, seed: int, num_classes: int = 10, dims: int = 8):
    generator = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(num_classes, dims, generator=torch.Generator().manual_seed(99))
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), dims, generator=generator), y


def mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, num_classes))


@pytest.fixture(scope="module")
def tiny():
    """(split, trained MLP, full-class scenario forgetting class 2)."""
    torch.set_num_threads(1)
    split = DatasetSplit(*blobs(30, 0), *blobs(15, 1), num_classes=10, name="blobs")
    torch.manual_seed(0)
    model = train(mlp(), split.x_train, split.y_train, epochs=40, seed=0)
    return split, model, full_class(split, [2])


def lowered(model: nn.Module, forgotten, by: float) -> nn.Module:
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        copy_[-1].bias[list(forgotten)] -= by
    return copy_


# --------------------------------------------------------------------------- the classifier layer


class HeadFirst(nn.Module):
    """Declares its head before its body: the head is found by call order, not by name order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Sequential(nn.Linear(8, 6), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


def test_the_classifier_layer_is_the_last_linear_called_and_its_inputs_are_read_exactly():
    torch.manual_seed(0)
    model, x = HeadFirst(), torch.randn(700, 8)  # more than one batch of 512
    name, layer = classifier_layer(model, x)
    assert name == "head" and layer is model.head
    with torch.no_grad():
        assert torch.equal(classifier_inputs(model, x), model.body(x))


class Doubled(nn.Module):
    """Its last Linear's 5 outputs are not its 10 logits."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 5)

    def forward(self, x):
        return torch.cat([self.layer(x), self.layer(x)], 1)


def test_a_model_without_a_classifier_layer_is_refused_by_name():
    with pytest.raises(ValueError, match="Sequential calls no nn.Linear"):
        classifier_layer(nn.Sequential(nn.Flatten()), torch.randn(2, 3))
    with pytest.raises(ValueError, match="'layer', gives 5 outputs but the model 10"):
        classifier_layer(Doubled(), torch.randn(2, 4))


# --------------------------------------------------------------------------- the probe


def test_the_probe_is_the_documented_pipeline_and_is_deterministic(tiny):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split, model, scenario = tiny
    first, second = linear_probe(model, scenario), linear_probe(model, scenario)
    assert first == second
    features = classifier_inputs(model, split.x_train).numpy()
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=0))
    correct = reference.fit(features, split.y_train.numpy()).predict(classifier_inputs(model, split.x_test).numpy()) \
        == split.y_test.numpy()
    forget = scenario.forget_test_mask.numpy()
    assert first == {"probe_forget": 100.0 * correct[forget].mean(), "probe_remain": 100.0 * correct[~forget].mean()}
    assert first["probe_forget"] > 90  # the features tell the blobs apart


def test_the_probe_sees_features_that_no_longer_separate_the_class(tiny):
    """A model whose classifier inputs are the same for every sample: the probe cannot do better
    than one class for all, so the forgotten class (a tenth of the data) gets 0 or 100."""
    split, _, scenario = tiny
    collapsed = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 10))
    with torch.no_grad():
        collapsed[0].weight.zero_()
    result = linear_probe(collapsed, scenario)
    assert result["probe_forget"] in (0.0, 100.0) and result["probe_remain"] <= 100 / 9 + 1e-9


def test_sub_class_probe_gives_the_forgotten_fine_label_a_class_of_its_own():
    from unsc_fast.evaluation.scenario import sub_class

    y = torch.arange(10).repeat(3)
    split = DatasetSplit(torch.randn(30, 1, 8, 8), y, torch.randn(30, 1, 8, 8), y, num_classes=10, name="digits")
    scenario = sub_class(split, 3)
    train_labels, test_labels = probe_labels(scenario)
    assert set(train_labels[y == 3].tolist()) == {5} and set(test_labels[y == 3].tolist()) == {5}
    assert torch.equal(train_labels[y != 3], scenario.split.y_train[y != 3])


# --------------------------------------------------------------------------- the relearning attack


def test_fitted_offsets_absorb_any_per_class_logit_offset():
    generator = torch.Generator().manual_seed(0)
    logits, y = torch.randn(100, 5, generator=generator), torch.arange(5).repeat(20)
    shift = torch.tensor([0.0, -30.0, 500.0, -1e3, 7.0])
    plain, shifted = fit_logit_offsets(logits, y), fit_logit_offsets(logits + shift, y)
    torch.testing.assert_close(logits + plain, logits + shift + shifted, atol=1e-3, rtol=0)


def test_relearn_set_holds_ten_forget_samples_per_label_and_ninety_spread_over_the_rest(tiny):
    _, _, scenario = tiny
    x, y = relearn_set(scenario, seed=0)
    assert (y == 2).sum() == 10 and len(y) == 100
    assert [int((y == c).sum()) for c in range(10) if c != 2] == [10] * 9
    x_again, _ = relearn_set(scenario, seed=0)
    assert torch.equal(x, x_again) and not torch.equal(x, relearn_set(scenario, seed=1)[0])


def test_the_attack_recovers_a_bias_lowered_model_that_fools_the_plain_attack(tiny):
    _, model, scenario = tiny
    suppressed = lowered(model, [2], 30.0)
    from unsc_fast.evaluation.metrics import accuracy

    assert accuracy(suppressed, *scenario.forget_test) == 0.0
    original = relearn_attack(model, scenario, seed=0)
    assert original > 90
    # fitted offsets: the lowered model is the original for the attack, however far the bias went
    assert relearn_attack(suppressed, scenario, seed=0) == pytest.approx(original, abs=2.0)
    assert relearn_attack(lowered(model, [2], 3e3), scenario, seed=0) == pytest.approx(original, abs=2.0)
    # the plain 10-step attack (Adam moves each weight ~1e-3 a step) cannot undo 30 logits
    assert relearn_attack(suppressed, scenario, seed=0, fit_offsets=False) == 0.0
    assert relearn_attack(model, scenario, seed=0, fit_offsets=False) > 90
    assert relearn_attack(model, scenario, seed=0) == original  # deterministic


def test_the_attack_leaves_the_model_untouched_and_is_undefined_without_a_forget_test_set(tiny):
    split, model, scenario = tiny
    before = copy.deepcopy(model.state_dict())
    relearn_attack(model, scenario, seed=0)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert np.isnan(relearn_attack(model, random_sample(split, 0.1, seed=0)))


def test_representation_gap_is_the_mean_of_the_two_forget_gaps():
    gaps = representation_gap({"probe_forget": 80.0, "relearn_forget": 10.0},
                              {"probe_forget": 60.0, "relearn_forget": 40.0})
    assert gaps == {"probe_forget": 20.0, "relearn_forget": 30.0, "representation_gap": 25.0}
    assert representation_gap({"probe_forget": float("nan"), "relearn_forget": 5.0},
                              {"probe_forget": float("nan"), "relearn_forget": 1.0})["representation_gap"] == 4.0


# --------------------------------------------------------------------------- logit_suppression


def test_logit_suppression_keeps_every_remaining_logit_bitwise_and_never_predicts_the_class(tiny):
    split, model, _ = tiny
    scenario = full_class(split, [1, 2])
    result = get_method("logit_suppression")(model, scenario, seed=0)
    before, after = predict_logits(model, split.x_train), predict_logits(result.model, split.x_train)
    remaining = [0, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(after[:, remaining], before[:, remaining])
    assert torch.equal(after[~scenario.forget_train_mask].argmax(1), before[~scenario.forget_train_mask].argmax(1))
    assert bool((after[:, [1, 2]].max(1).values < after[:, remaining].min(1).values).all())  # on every training sample
    changed = {key for key, value in result.model.state_dict().items() if not torch.equal(value, model.state_dict()[key])}
    assert changed == {"4.bias"}
    assert torch.equal(result.model[-1].bias[remaining], model[-1].bias[remaining])
    assert result.info["layer"] == "4" and result.info["bias_shift"] > 1.0


def test_suppression_shift_is_the_worst_excess_plus_the_margin():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, -1.0, 0.5]])
    assert suppression_shift(logits, [1], margin=1.0) == 5.0 - 0.0 + 1.0  # row 0: 5 above the lowest remaining
    assert suppression_shift(torch.tensor([[3.0, -9.0, 4.0]]), [1], margin=0.5) == 0.5  # already below


def test_logit_suppression_refuses_what_it_cannot_do(tiny):
    split, model, scenario = tiny
    with pytest.raises(UnsupportedScenario, match="no class to suppress"):
        get_method("logit_suppression")(model, random_sample(split, 0.1, seed=0))
    no_bias = nn.Sequential(nn.Linear(8, 10, bias=False))
    with pytest.raises(ValueError, match="'0' has none"):
        get_method("logit_suppression")(no_bias, scenario)
    negated = nn.Sequential(nn.Linear(8, 10), nn.Tanh())  # the logits are not the layer's outputs
    with torch.no_grad():
        negated[0].bias.fill_(10.0)  # tanh saturates: lowering the bias barely moves it
    with pytest.raises(RuntimeError, match="transforms that layer's output"):
        get_method("logit_suppression")(negated, scenario, {"margin": 1e-9})
