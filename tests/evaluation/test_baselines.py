"""The literature's baselines (SCRUB, Bad Teacher, SSD, Fisher forgetting, NegGrad+, Amnesiac),
each checked for the one thing that defines it, on a tiny model and tiny data.

The interface checks every method shares (runs, leaves the original alone, returns a
changed model) are in test_methods.py, which runs over every registered method.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from unsc_fast.evaluation.methods import METHODS, get_method
from unsc_fast.evaluation.methods import amnesiac, bad_teacher, fisher, neggrad_plus, scrub, ssd
from unsc_fast.evaluation.methods.distillation import distillation_kl
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.training import predict_logits

FORGET = 3
BASELINES = ("scrub", "bad_teacher", "ssd", "fisher", "neggrad_plus", "amnesiac")


from evaluation_helpers import tiny_digits  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """(trained DigitsCNN(width=8), full-class scenario, random-sample scenario) on 300 digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, model, full_class, random_sample = tiny_digits(FORGET)
    yield model, full_class, random_sample
    torch.set_num_threads(threads)


def mean_kl(teacher_logits, student_logits):
    """Mean KL(teacher || student) at temperature 1."""
    return float(distillation_kl(student_logits, teacher_logits.softmax(1), 1.0))


def test_baselines_are_registered_with_their_official_defaults():
    assert set(BASELINES) <= set(METHODS)
    assert get_method("scrub").defaults["max_steps"] == 3 and get_method("scrub").defaults["lr"] == 5e-4
    assert get_method("bad_teacher").defaults == dict(epochs=1, lr=1e-4, batch_size=256, temperature=1.0,
                                                       retain_fraction=0.3)
    assert get_method("ssd").defaults["alpha"] == 10.0 and get_method("ssd").defaults["dampening"] == 1.0
    assert get_method("fisher").defaults["alpha"] == 1e-6
    assert get_method("neggrad_plus").defaults["alpha"] == 0.95
    assert get_method("amnesiac").defaults == dict(epochs=3, lr=1e-4, batch_size=128)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_do_random_sample_forgetting_too(tiny, name):
    model, _, random_sample = tiny
    settings = {"epochs": 1} if "epochs" in get_method(name).defaults else {}
    result = get_method(name)(model, random_sample, settings, seed=0)
    assert accuracy(result.model, *random_sample.remain) > 50


# --------------------------------------------------------------------------- SCRUB


def test_scrub_learning_rate_decays_after_each_listed_epoch():
    settings = get_method("scrub").settings()
    assert [scrub.scrub_lr(epoch, settings) for epoch in (1, 5, 6, 8, 9, 10)] == pytest.approx(
        [5e-4, 5e-4, 5e-5, 5e-5, 5e-6, 5e-7])


def test_scrub_max_steps_increase_the_forget_loss_and_min_steps_keep_the_rest(tiny):
    model, scenario, _ = tiny
    settings = get_method("scrub").settings({"lr": 1e-3, "weight_decay": 0.0})
    from unsc_fast.training import make_loader

    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings["lr"])
    x_forget, y_forget = scenario.forget
    before = F.cross_entropy(predict_logits(student, x_forget), y_forget).item()
    forget = make_loader(x_forget, y_forget, 64, shuffle=True, seed=0)
    for _ in range(3):
        scrub.scrub_epoch(student, teacher, forget, optimizer, settings, maximize=True)
    after = F.cross_entropy(predict_logits(student, x_forget), y_forget).item()
    assert after > before + 1.0
    assert mean_kl(predict_logits(teacher, x_forget), predict_logits(student, x_forget)) > 0.5
    # the full method (max then min epochs): the class is gone, the remaining data kept
    result = get_method("scrub")(model, scenario, {"epochs": 4, "lr": 2e-3}, seed=0)
    assert all(h["max"] < 0 for h in result.info["history"][:3]) and result.info["history"][3]["max"] is None
    assert accuracy(result.model, *scenario.forget) < accuracy(model, *scenario.forget) - 50
    assert accuracy(result.model, *scenario.remain_test) > accuracy(model, *scenario.remain_test) - 10


# --------------------------------------------------------------------------- Bad Teacher


def test_bad_teacher_targets_pick_the_incompetent_teacher_on_forget_rows(tiny):
    model, scenario, _ = tiny
    x = scenario.forget[0][:4]
    bad = bad_teacher.incompetent_teacher(model, seed=1)
    flag = torch.tensor([1, 0, 1, 0])
    targets = bad_teacher.teacher_targets(model, bad, x, flag, temperature=1.0)
    assert torch.allclose(targets[[0, 2]], predict_logits(bad, x[[0, 2]]).softmax(1), atol=1e-6)
    assert torch.allclose(targets[[1, 3]], predict_logits(model, x[[1, 3]]).softmax(1), atol=1e-6)


def test_bad_teacher_moves_forget_outputs_towards_the_incompetent_teacher(tiny):
    model, scenario, _ = tiny
    x_forget, _ = scenario.forget
    seed = 0
    bad = bad_teacher.incompetent_teacher(model, seed + 12345)  # the teacher the method draws for this seed
    before = mean_kl(predict_logits(bad, x_forget), predict_logits(model, x_forget))
    result = get_method("bad_teacher")(model, scenario, {"epochs": 5, "lr": 1e-3, "batch_size": 32}, seed=seed)
    after = mean_kl(predict_logits(bad, x_forget), predict_logits(result.model, x_forget))
    assert after < 0.3 * before
    assert accuracy(result.model, *scenario.forget) < 30
    x_remain, _ = scenario.remain
    assert mean_kl(predict_logits(model, x_remain), predict_logits(result.model, x_remain)) < 0.2
    assert result.info["unlearning_samples"] == len(x_forget) + int(0.3 * len(x_remain))


# --------------------------------------------------------------------------- SSD


def test_ssd_dampens_only_parameters_more_important_to_the_forget_set():
    layer = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
    full = [torch.tensor([[1.0, 1.0, 1.0]])]
    forget = [torch.tensor([[5.0, 20.0, 40.0]])]  # alpha = 10: only the last two are selected
    fraction = ssd.dampen(layer, full, forget, alpha=10.0, dampening=1.0)
    assert fraction == pytest.approx(2 / 3)
    # selected weights shrink by lambda * I / I_f; the unselected one is untouched
    assert torch.allclose(layer.weight, torch.tensor([[1.0, -2.0 / 20, 3.0 / 40]]))
    # the factor is bounded by 1: dampening never amplifies
    big = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        big.weight.fill_(2.0)
    ssd.dampen(big, [torch.tensor([[1.0]])], [torch.tensor([[20.0]])], alpha=10.0, dampening=100.0)
    assert big.weight.item() == 2.0


def test_ssd_importance_is_the_mean_squared_batch_gradient(tiny):
    model, scenario, _ = tiny
    x, y = scenario.forget
    importances = ssd.importance(model, x, y, batch_size=8)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    model.eval()
    for start in range(0, len(x), 8):
        model.zero_grad()
        F.cross_entropy(model(x[start:start + 8]), y[start:start + 8]).backward()
        for total, p in zip(expected, model.parameters()):
            total += p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    batches = -(-len(x) // 8)
    for got, want in zip(importances, expected):
        assert torch.allclose(got, want / batches, rtol=1e-4, atol=1e-10)


def test_ssd_method_changes_exactly_the_selected_parameters(tiny):
    model, scenario, _ = tiny
    x_forget, y_forget = scenario.forget
    x_remain, y_remain = scenario.remain
    forget_importance = ssd.importance(model, x_forget, y_forget)
    full_importance = ssd.importance(model, torch.cat([x_remain, x_forget]), torch.cat([y_remain, y_forget]))
    result = get_method("ssd")(model, scenario, {"alpha": 2.0}, seed=0)
    assert 0 < result.info["selected_fraction"] < 0.5
    for before, after, full, forget in zip(model.parameters(), result.model.parameters(), full_importance,
                                           forget_importance):
        selected = forget > 2.0 * full
        assert torch.equal(before[~selected], after[~selected])
        assert (after[selected].abs() <= before[selected].abs()).all()


# --------------------------------------------------------------------------- Fisher forgetting


def test_fisher_diagonal_matches_the_official_one_sample_loop(tiny):
    model, scenario, _ = tiny
    x = scenario.remain[0][:5]
    fast = fisher.fisher_diagonal(model, x, batch_size=3)
    slow = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    model.eval()
    for sample in x:
        logits = model(sample[None])
        probabilities = logits.softmax(1).detach()
        for label in range(10):
            model.zero_grad()
            F.cross_entropy(logits, torch.tensor([label])).backward(retain_graph=True)
            for name, p in model.named_parameters():
                slow[name] += probabilities[0, label] * p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    for name in slow:
        assert torch.allclose(fast[name], slow[name] / len(x), rtol=1e-3, atol=1e-9), name


def test_fisher_noise_variance_scales_with_the_inverse_fisher(tiny):
    model, _, _ = tiny
    names = dict(model.named_parameters())
    fisher_info = {name: torch.full_like(p, 1e-2) for name, p in names.items()}
    doubled = {name: 2 * value for name, value in fisher_info.items()}
    first = fisher.noise_distribution(model, fisher_info, alpha=1e-6)
    second = fisher.noise_distribution(model, doubled, alpha=1e-6)
    head = fisher.head_names(model)
    assert head == {"classifier.3.weight", "classifier.3.bias"}
    for name, p in names.items():
        mu, var = first[name]
        assert torch.equal(mu, p.detach())
        assert torch.allclose(second[name][1], var / 2, rtol=1e-5)       # twice the information: half the noise
        scale = 10 if (name in head or p.ndim == 1) else 1
        assert torch.allclose(var, torch.full_like(var, scale * 1e-6 / (1e-2 + 1e-8)), rtol=1e-5), name
    # clamping: no information at all gives at most alpha * 1e3 (1e2 for the head), times 10 where scaled
    none = fisher.noise_distribution(model, {n: torch.zeros_like(p) for n, p in names.items()}, alpha=1e-6)
    assert torch.allclose(none["features.0.0.weight"][1], torch.tensor(1e-3))
    assert torch.allclose(none["classifier.3.weight"][1], torch.tensor(1e-3))
    # class forgetting: the forgotten class's head row is centred on 0 with variance 1e-4 * 10
    forgetting = fisher.noise_distribution(model, fisher_info, alpha=1e-6, forget_classes=(FORGET,))
    mu, var = forgetting["classifier.3.weight"]
    assert mu[FORGET].eq(0).all() and torch.allclose(var[FORGET], torch.tensor(1e-3))
    assert torch.equal(mu[FORGET + 1], names["classifier.3.weight"][FORGET + 1].detach())


def test_fisher_forgetting_adds_noise_where_the_remaining_data_is_uninformative(tiny):
    model, scenario, _ = tiny
    result = get_method("fisher")(model, scenario, seed=0)
    again = get_method("fisher")(model, scenario, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(result.model.parameters(), again.model.parameters()))
    # the forgotten class's head row is resampled around 0, so the class is gone
    row = dict(result.model.named_parameters())["classifier.3.weight"][FORGET]
    assert row.abs().mean() < 0.1
    assert accuracy(result.model, *scenario.forget) <= 10


# --------------------------------------------------------------------------- NegGrad+


def test_neggrad_plus_gradient_is_alpha_retain_descent_minus_one_minus_alpha_forget(tiny):
    model, scenario, _ = tiny
    retain = [t[:16] for t in scenario.remain]
    forget = [t[:16] for t in scenario.forget]
    model.eval()

    def gradient(loss):
        model.zero_grad()
        loss.backward()
        out = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return out

    original = copy.deepcopy(model)
    retain_gradient = gradient(F.cross_entropy(model(retain[0]), retain[1]))
    forget_gradient = gradient(F.cross_entropy(model(forget[0]), forget[1]))
    for alpha in (0.95, 0.5, 1.0, 0.0):
        combined = gradient(neggrad_plus.neggrad_plus_loss(model, original, retain, forget, alpha, 0.1))
        assert torch.allclose(combined, alpha * retain_gradient - (1 - alpha) * forget_gradient, atol=1e-6)
    # away from the original weights the l2 pull appears, on the retain side
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    pulled = neggrad_plus.neggrad_plus_loss(moved, original, retain, forget, 1.0, 0.1).item()
    plain = neggrad_plus.neggrad_plus_loss(moved, original, retain, forget, 1.0, 0.0).item()
    count = sum(p.numel() for p in model.parameters())
    assert pulled - plain == pytest.approx(0.05 * count * 1e-4, rel=1e-3)


def test_neggrad_plus_forgets_more_as_alpha_falls(tiny):
    model, scenario, _ = tiny
    common = {"epochs": 2, "lr": 0.01}
    mostly_retain = get_method("neggrad_plus")(model, scenario, {**common, "alpha": 0.99}, seed=0)
    more_ascent = get_method("neggrad_plus")(model, scenario, {**common, "alpha": 0.95}, seed=0)
    assert accuracy(more_ascent.model, *scenario.forget) < accuracy(mostly_retain.model, *scenario.forget) - 30
    assert accuracy(more_ascent.model, *scenario.remain_test) > 80
    with pytest.raises(ValueError, match="alpha"):
        get_method("neggrad_plus")(model, scenario, {"alpha": 1.5})


# --------------------------------------------------------------------------- Amnesiac


def test_amnesiac_labels_are_any_class_but_the_own_one():
    y = torch.full((5000,), FORGET)
    labels = amnesiac.amnesiac_labels(y, 10, torch.Generator().manual_seed(0))
    assert (labels != FORGET).all()
    counts = torch.bincount(labels, minlength=10)
    assert counts[FORGET] == 0 and (counts[torch.arange(10) != FORGET] > 450).all()  # about uniform over 9


def test_amnesiac_fine_tunes_on_the_remaining_data_plus_relabelled_forget_data(tiny, monkeypatch):
    model, scenario, _ = tiny
    seen = {}
    real = amnesiac.fine_tune

    def recording(net, x, y, **kwargs):
        seen.update(x=x, y=y, **kwargs)
        return real(net, x, y, **kwargs)

    monkeypatch.setattr(amnesiac, "fine_tune", recording)
    result = get_method("amnesiac")(model, scenario, seed=0)
    x_remain, y_remain = scenario.remain
    x_forget, y_forget = scenario.forget
    assert torch.equal(seen["x"], torch.cat([x_remain, x_forget]))
    assert torch.equal(seen["y"][: len(y_remain)], y_remain)
    assert torch.equal(seen["y"][len(y_remain):], result.info["forget_labels"])
    assert (result.info["forget_labels"] != y_forget).all()
    assert seen["optimizer"] == "adamw" and seen["weight_decay"] == 0.0 and seen["lr"] == 1e-4 and seen["epochs"] == 3
