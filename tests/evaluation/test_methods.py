"""Every unlearning method on a tiny model and tiny data, each checked for what it must do.

One DigitsCNN(width=8) is trained once per module on 30 digits per class (300 samples);
every method then runs a few epochs on it in well under a second.
"""
import copy

import pytest
import torch

from unsc_fast.evaluation.methods import METHODS, MethodResult, UnsupportedScenario, get_method
from unsc_fast.evaluation.methods import boundary, l1_sparse, natmu, random_labels, retrain, salun
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.evaluation.recipes import train
from unsc_fast.training import predict_logits

FORGET = 3


from evaluation_helpers import tiny_digits  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """(split, trained original model, full-class scenario, random-sample scenario)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny convolutions run fastest single-threaded
    split, model, full_class, random_sample = tiny_digits(FORGET)
    # the original must know the class, or "forgetting" it would prove nothing
    assert accuracy(model, *full_class.forget) >= 90 and accuracy(model, *full_class.forget_test) >= 80
    yield split, model, full_class, random_sample
    torch.set_num_threads(threads)


def state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def same_state(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def few_epochs(name):
    """Settings that keep each method to about a tenth of a second here."""
    return {"epochs": 2} if "epochs" in get_method(name).defaults else {}


# --------------------------------------------------------------------------- the interface


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_and_never_touches_the_original(tiny, name):
    _, model, scenario, _ = tiny
    before = state(model)
    result = get_method(name)(model, scenario, few_epochs(name), seed=0)
    assert isinstance(result, MethodResult) and result.method == name
    assert result.model is not model
    assert same_state(state(model), before), f"{name} modified the original model"
    assert not same_state(state(result.model), before), f"{name} returned the original weights unchanged"
    assert not result.model.training
    assert result.seconds > 0
    assert result.settings == {**get_method(name).defaults, **few_epochs(name)}


def test_methods_are_listed_with_retrain_first_and_found_by_either_spelling():
    assert list(METHODS)[0] == "retrain"
    assert {"unsc", "unsc_random_labels", "unsc_no_projection", "natmu", "finetune", "gradient_ascent",
            "random_labels", "boundary", "l1_sparse", "salun"} <= set(METHODS)
    assert get_method("gradient-ascent") is METHODS["gradient_ascent"]
    with pytest.raises(KeyError, match="unknown method 'forgetful'"):
        get_method("forgetful")


def test_unknown_setting_is_a_key_error_naming_it_and_the_known_ones(tiny):
    _, model, scenario, _ = tiny
    with pytest.raises(KeyError, match=r"unsc has no setting epoch; it has adaptive, batch_size, confidence, criterion, distill, epochs, erasure_checks, features, guard, labels, lr"):
        get_method("unsc")(model, scenario, {"epoch": 3})


def test_unsc_settings_reach_the_stop_rule(tiny, monkeypatch):
    """compare's --set unsc.tolerance / erasure_checks / confidence / stop_when_stalled / strict_erasure build the
    StopRule the run gets; the official pipeline, which has none of them, keeps its fixed epochs."""
    import unsc_fast.evaluation.methods.unsc as unsc_method

    _, model, scenario, _ = tiny
    seen = {}

    def record(*_args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(unsc_method, "unlearn", record)
    with pytest.raises(KeyboardInterrupt):
        get_method("unsc")(model, scenario, {"tolerance": 1.5, "erasure_checks": None, "confidence": 0.3,
                                             "stop_when_stalled": True, "strict_erasure": True, "epochs": 7})
    rule = seen["stop"]
    assert (rule.tolerance, rule.max_erasure_checks, rule.confidence, rule.stop_when_stalled, rule.strict_erasure,
            rule.max_epochs) == (1.5, None, 0.3, True, True, 7)
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        get_method("unsc_official")(model, scenario, {})
    assert "stop" not in seen


def test_unsupported_scenario_raises_with_a_clear_message(tiny):
    _, model, _, random_sample = tiny
    assert not get_method("boundary").supports("random_sample")
    with pytest.raises(UnsupportedScenario, match="boundary cannot do random-sample forgetting: .*class forgetting only"):
        get_method("boundary")(model, random_sample)
    assert issubclass(UnsupportedScenario, ValueError)


def test_same_seed_same_model_different_seed_different_model(tiny):
    _, model, scenario, _ = tiny
    first = get_method("random_labels")(model, scenario, {"epochs": 1}, seed=0)
    again = get_method("random_labels")(model, scenario, {"epochs": 1}, seed=0)
    other = get_method("random_labels")(model, scenario, {"epochs": 1}, seed=1)
    assert same_state(state(first.model), state(again.model))
    assert not same_state(state(first.model), state(other.model))


# --------------------------------------------------------------------------- retrain


def test_retrain_trains_fresh_weights_on_the_remaining_data_only(tiny, monkeypatch):
    _, model, scenario, _ = tiny
    seen = []

    def recording_train(net, x, y, **kwargs):
        seen.append((x, y))
        return train(net, x, y, **kwargs)

    monkeypatch.setattr(retrain, "train", recording_train)
    result = get_method("retrain")(model, scenario, {"epochs": 2}, seed=0)

    (x, y), = seen
    x_forget, _ = scenario.forget
    assert torch.equal(x, scenario.remain[0]) and torch.equal(y, scenario.remain[1])
    assert (y != FORGET).all()
    # no forget image, bit for bit, is among the inputs it trained on
    assert not (x.flatten(1)[:, None, :] == x_forget.flatten(1)[None, :, :]).all(-1).any()

    # nothing of the original's weights or statistics survives: a scrambled original gives the same model
    scrambled = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in scrambled.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(7.0)
    from_scrambled = get_method("retrain")(scrambled, scenario, {"epochs": 2}, seed=0)
    assert same_state(state(result.model), state(from_scrambled.model))


# --------------------------------------------------------------------------- UNSC


def test_unsc_forgets_the_class_and_keeps_the_rest(tiny):
    _, model, scenario, _ = tiny
    before_remain = accuracy(model, *scenario.remain_test)
    result = get_method("unsc")(model, scenario, {}, seed=0)  # the library's defaults
    assert accuracy(result.model, *scenario.forget) <= 10
    # 15 test samples of the class on a model trained for seconds: 3 stay (20 %; 2 with an
    # unbounded erasure phase, 2 at 0.97 too)
    assert accuracy(result.model, *scenario.forget_test) <= 100 * 3 / 15 + 1e-4
    assert accuracy(result.model, *scenario.remain_test) >= before_remain - 5
    labels = result.info["forget_labels"]
    assert (labels != FORGET).all() and len(labels) == len(scenario.forget[1])

    # the projection is what keeps the rest: the same updates unconstrained ruin it
    free = get_method("unsc_no_projection")(model, scenario, dict(epochs=10, lr=0.03, stop="epochs"), seed=0)
    assert accuracy(free.model, *scenario.remain_test) < accuracy(result.model, *scenario.remain_test) - 20


def test_unsc_ablations_differ_in_labels_only_where_they_should(tiny):
    _, model, scenario, _ = tiny
    calibrated = get_method("unsc")(model, scenario, {"epochs": 1}).info["forget_labels"]
    no_projection = get_method("unsc_no_projection")(model, scenario, {"epochs": 1}).info["forget_labels"]
    randomised = get_method("unsc_random_labels")(model, scenario, {"epochs": 1}).info["forget_labels"]
    assert torch.equal(calibrated, no_projection)
    assert not torch.equal(calibrated.argmax(1), randomised)
    # calibration, in its soft form (the default preset's targets): the original's distribution
    # over the classes other than the forgotten one, whose argmax is the calibrated label
    logits = predict_logits(model, scenario.forget[0])
    logits[:, FORGET] = float("-inf")
    assert torch.allclose(calibrated, torch.softmax(logits, dim=1), atol=0, rtol=1e-6)
    assert torch.equal(calibrated.argmax(1), logits.argmax(1))
    hard = get_method("unsc")(model, scenario, {"epochs": 1, "labels": "calibrate"}).info["forget_labels"]
    assert torch.equal(hard, logits.argmax(1))  # labels="calibrate": the paper's hard labels


@pytest.mark.parametrize("name", ["unsc", "unsc_official", "unsc_random_labels"])
def test_projected_unsc_refuses_random_sample_forgetting_with_the_reason(tiny, name):
    _, model, _, random_sample = tiny
    assert not get_method(name).supports("random_sample")
    with pytest.raises(UnsupportedScenario, match="span the same layer inputs"):
        get_method(name)(model, random_sample, {"epochs": 1})
    # calibration alone still does it
    result = get_method("unsc_no_projection")(model, random_sample, {"epochs": 1})
    assert (result.info["forget_labels"].argmax(1) != random_sample.forget[1]).all()


def test_unsc_official_runs_the_official_pipeline_and_forgets(tiny):
    _, model, scenario, _ = tiny
    result = get_method("unsc_official")(model, scenario, {"batch_size": 4})
    assert result.settings["momentum"] == 0.0 and result.settings["lr"] == 0.04
    assert accuracy(result.model, *scenario.forget) <= 20
    assert accuracy(result.model, *scenario.remain_test) >= accuracy(model, *scenario.remain_test) - 10


# --------------------------------------------------------------------------- gradient ascent


def test_gradient_ascent_lowers_forget_accuracy(tiny):
    _, model, scenario, _ = tiny
    before = accuracy(model, *scenario.forget)
    result = get_method("gradient_ascent")(model, scenario, {"epochs": 3, "lr": 3e-3})
    assert accuracy(result.model, *scenario.forget) <= before - 40


# --------------------------------------------------------------------------- NatMU


def test_tent_ramps():
    assert torch.allclose(natmu.tent(7), torch.tensor([0, 1, 2, 3, 2, 1, 0]) / 3.5)
    assert torch.allclose(natmu.tent(32)[:16], torch.arange(16) / 16)           # the paper's j/16 ...
    assert torch.allclose(natmu.tent(32)[16:], 15 / 16 - torch.arange(16) / 16)  # ... and 15/16 - j/16
    assert natmu.tent(1).tolist() == [0.0]


def test_natmu_masks_geometry_for_odd_sizes_and_three_channels():
    height, width = 7, 9
    masks = natmu.natmu_masks(3, height, width, delta=0.0)
    assert masks.shape == (4, 3, height, width)
    assert masks.min() >= 0 and masks.max() <= 1
    assert torch.equal(masks, masks[:, :1].expand_as(masks))  # the same on every channel
    rows, columns = natmu.tent(height), natmu.tent(width)
    # 0: tent across the rows, constant along each row: 0 at top and bottom, peak in the middle row
    assert torch.allclose(masks[0, 0], rows[:, None].expand(height, width))
    assert masks[0, 0, 0].eq(0).all() and masks[0, 0, -1].eq(0).all() and masks[0, 0, height // 2].eq(rows.max()).all()
    # 1: the same across the columns
    assert torch.allclose(masks[1, 0], columns[None, :].expand(height, width))
    assert masks[1, 0, :, 0].eq(0).all() and masks[1, 0, :, width // 2].eq(columns.max()).all()
    # 2, 3: the inverted tents, highest at the edges, 0 in the middle
    assert torch.allclose(masks[2] + masks[0], torch.full_like(masks[0], float(rows.max())))
    assert torch.allclose(masks[3] + masks[1], torch.full_like(masks[1], float(columns.max())))
    assert masks[2, 0, height // 2].eq(0).all() and masks[3, 0, :, width // 2].eq(0).all()


def test_natmu_masks_are_shifted_by_delta_and_clipped():
    plain = natmu.natmu_masks(1, 8, 8, delta=0.0)
    shifted = natmu.natmu_masks(1, 8, 8, delta=-0.1)
    assert torch.allclose(shifted, (plain - 0.1).clamp(0, 1))
    assert shifted.min() == 0 and (shifted < plain).any()
    assert natmu.natmu_masks(1, 8, 8, delta=0.5).max() == 1.0


def test_natmu_patches_blend_forget_with_remaining_and_carry_its_label(tiny):
    _, model, scenario, _ = tiny
    x_forget, y_forget = scenario.forget
    x_remain, y_remain = scenario.remain
    patches, labels, used = natmu.patched_samples(model, scenario.forget, scenario.remain, top_k=4, delta=-0.1,
                                                  excluded=(FORGET,), seed=0)
    count = len(x_forget)
    assert patches.shape == (4 * count, *x_forget.shape[1:])
    assert torch.equal(labels, y_remain[used])                       # the remaining sample's label ...
    assert (labels != FORGET).all()                                  # ... never the forgotten class
    # patch = remain * (1 - M) + forget * M, with mask j for the j-th patch of each forget sample
    masks = natmu.natmu_masks(*x_forget.shape[1:], delta=-0.1)
    expected = x_forget.repeat_interleave(4, 0) * masks.repeat(count, 1, 1, 1) \
        + x_remain[used] * (1 - masks.repeat(count, 1, 1, 1))
    assert torch.allclose(patches, expected, atol=1e-6)
    # each forget sample's four patches use four distinct remaining samples of its top-4 other classes
    logits = predict_logits(model, x_forget)
    logits[:, FORGET] = float("-inf")
    top4 = logits.topk(4, dim=1).indices
    assert torch.equal(labels.view(count, 4), top4)
    for row in used.view(count, 4):
        assert len(set(row.tolist())) == 4
    # and a class's remaining samples are all used once before any is used twice
    for label in labels.unique():
        uses = used[labels == label]
        members = int((y_remain == label).sum())
        counts = torch.bincount(uses, minlength=len(y_remain))[y_remain == label]
        assert counts.max() <= -(-len(uses) // members)


def test_natmu_random_sample_patches_never_carry_the_samples_own_label(tiny):
    _, model, _, random_sample = tiny
    _, y_forget = random_sample.forget
    _, labels, _ = natmu.patched_samples(model, random_sample.forget, random_sample.remain, top_k=3)
    assert (labels.view(len(y_forget), 3) != y_forget[:, None]).all()


def test_natmu_runs_on_remaining_data_plus_patches(tiny):
    _, model, scenario, _ = tiny
    result = get_method("natmu")(model, scenario, {"epochs": 1, "top_k": 2})
    assert result.info["patches"] == 2 * len(scenario.forget[1])


# --------------------------------------------------------------------------- boundary


def test_fgsm_moves_every_pixel_by_epsilon(tiny):
    _, model, scenario, _ = tiny
    x, y = scenario.forget
    moved = boundary.fgsm(model, x, y, 0.25) - x
    assert torch.allclose(moved.abs()[moved != 0], torch.tensor(0.25))
    assert (moved != 0).float().mean() > 0.5


def test_boundary_labels_differ_from_the_true_ones(tiny):
    _, model, scenario, _ = tiny
    x, y = scenario.forget
    labels = boundary.boundary_labels(model, x, y, 0.5, excluded=(FORGET,))
    assert (labels != y).all() and (labels != FORGET).all()
    # they are the adversarial points' predictions (where those are allowed)
    adversarial = predict_logits(model, boundary.fgsm(model, x, y, 0.5))
    adversarial[:, FORGET] = float("-inf")
    assert torch.equal(labels, adversarial.argmax(1))
    result = get_method("boundary")(model, scenario, {"epochs": 1})
    assert torch.equal(result.info["forget_labels"], labels)


# --------------------------------------------------------------------------- random labels


def test_random_labels_are_never_the_true_label_nor_a_forgotten_class(tiny):
    _, _, scenario, random_sample = tiny
    x, y, labels = random_labels.relabelled_training_set(scenario, seed=0)
    x_forget, y_forget = scenario.forget
    assert (labels != y_forget).all() and (labels != FORGET).all()
    assert torch.equal(x, torch.cat([scenario.remain[0], x_forget]))
    assert torch.equal(y, torch.cat([scenario.remain[1], labels]))
    _, _, sample_labels = random_labels.relabelled_training_set(random_sample, seed=0)
    assert (sample_labels != random_sample.forget[1]).all()
    # over many draws, every allowed class comes up (they are random, not a fixed shift)
    drawn = torch.cat([random_labels.relabelled_training_set(scenario, seed)[2] for seed in range(10)])
    assert set(drawn.tolist()) == set(range(10)) - {FORGET}


def test_random_labels_method_forgets(tiny):
    _, model, scenario, _ = tiny
    result = get_method("random_labels")(model, scenario, {"epochs": 3})
    assert accuracy(result.model, *scenario.forget) <= 20


# --------------------------------------------------------------------------- SalUn


def test_saliency_mask_keeps_the_requested_fraction(tiny):
    _, model, scenario, _ = tiny
    mask = salun.saliency_mask(model, *scenario.forget, 0.2)
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert list(mask) == parameters
    total = sum(p.numel() for p in parameters)
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(0.2 * total)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in mask.values())
    with pytest.raises(ValueError, match="saliency_fraction"):
        salun.saliency_mask(model, *scenario.forget, 0.0)


def test_salun_moves_only_the_salient_weights(tiny):
    _, model, scenario, _ = tiny
    mask = salun.saliency_mask(model, *scenario.forget, 0.2)
    result = get_method("salun")(model, scenario, {"epochs": 2, "saliency_fraction": 0.2})
    assert result.info["mask_fraction"] == pytest.approx(0.2, abs=1e-4)
    moved = total = 0
    for (name, before), after in zip(model.named_parameters(), result.model.parameters()):
        changed = before != after
        assert not (changed & (mask[before] == 0)).any(), f"{name}: a weight outside the mask moved"
        moved, total = moved + int(changed.sum()), total + before.numel()
    assert 0.05 * total < moved <= round(0.2 * total)


# --------------------------------------------------------------------------- l1-sparse


def test_l1_penalty_decays_linearly_to_zero(tiny):
    _, model, _, _ = tiny
    norm = sum(float(p.detach().abs().sum()) for p in model.parameters())
    penalty = l1_sparse.l1_penalty(0.01)
    assert float(penalty(model, 0.0).detach()) == pytest.approx(0.01 * norm, rel=1e-5)
    assert float(penalty(model, 0.5).detach()) == pytest.approx(0.005 * norm, rel=1e-5)
    assert float(penalty(model, 1.0).detach()) == 0.0


def test_l1_sparse_shrinks_the_weights_more_than_plain_fine_tuning(tiny):
    _, model, scenario, _ = tiny

    def l1(net):
        return sum(float(p.detach().abs().sum()) for p in net.parameters())

    common = {"epochs": 2, "lr": 0.05, "momentum": 0.9, "batch_size": 64}
    sparse = get_method("l1_sparse")(model, scenario, common, seed=0)
    plain = get_method("finetune")(model, scenario, {**common, "weight_decay": 0.0}, seed=0)
    assert l1(sparse.model) < 0.97 * l1(plain.model)
    # with alpha = 0 the two are the same training run
    unpenalised = get_method("l1_sparse")(model, scenario, {**common, "alpha": 0.0}, seed=0)
    assert l1(unpenalised.model) == pytest.approx(l1(plain.model), rel=1e-6)


def test_natmu_full_class_defaults_are_the_official_script_s(tiny, monkeypatch):
    """class-wise/scripts/full-class/natmu.sh: -i (every Linear redrawn), delta -0.053, lr 2.8e-4;
    the sample-wise settings stay as they were."""
    _, model, full_class, random_sample = tiny
    assert natmu.resolved(natmu.DEFAULTS, "full_class") == {
        **natmu.DEFAULTS, "delta": -0.053, "lr": 2.8e-4, "init_linear": True}
    assert natmu.resolved(natmu.DEFAULTS, "random_sample")["init_linear"] is False
    assert natmu.resolved({**natmu.DEFAULTS, "lr": 0.5}, "full_class")["lr"] == 0.5  # the user's value wins
    calls = []
    monkeypatch.setattr(natmu, "fine_tune", lambda net, x, y, **kw: calls.append((net, kw)))
    result = get_method("natmu")(model, full_class, {"epochs": 1}, seed=0)
    (net, kw), = calls
    assert kw["lr"] == 2.8e-4 and result.info["settings"]["delta"] == -0.053
    for (name, before), (_, after) in zip(model.named_modules(), net.named_modules()):
        if isinstance(before, torch.nn.Linear):
            assert not torch.equal(before.weight, after.weight), f"{name} was not re-initialised"
            assert torch.equal(before.bias, after.bias)


def test_natmu_masks_for_one_dimensional_signals():
    """MNIST-1D's samples are (C, L) signals: NatMU blends them with the two tents along the
    signal (complementary with the remaining sample's 1 - M); images keep the four tents."""
    masks = natmu.sample_masks((2, 40), delta=0.0)
    assert masks.shape == (2, 2, 40)
    peak = masks[0].max()
    assert torch.allclose(masks[0] + masks[1], torch.full((2, 40), float(peak)))  # a tent and its inverse
    assert masks[0, 0, 0] == 0 and masks[0, 0, -1] == 0 and masks[0, 0, 20] == peak
    assert natmu.sample_masks((3, 8, 8), delta=0.0).shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="images .* or signals"):
        natmu.sample_masks((5,), delta=0.0)
