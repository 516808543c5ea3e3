"""The unlearning loop's decisions (unsc_fast.unlearning): stop when the forget data is
forgotten, back off when the guard shows significant damage (restore, halve the lr, raise the
protection's floor), lower the protection when forgetting stalls, stop within the budget; the
ladder of protection levels; the stop rule's settings."""
import pytest
import torch
from torch import nn

from unsc_fast.unlearning import loop
from unsc_fast.unlearning.schedule import ProtectionSchedule
from unsc_fast.unlearning.stopping import Monitor, StopRule


class Scripted(Monitor):
    """A monitor that replays ``(forget, damage, significant)`` per check."""

    def __init__(self, script):
        self.script, self.features, self.calls, self.unseen_set = list(script), None, 0, None

    def forget(self, model):
        return self.script[min(self.calls, len(self.script) - 1)][0]

    def guard_damage(self, model, tolerance=0.0):
        entry = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return entry[1], entry[2]


def setup(script, rule=None, levels=(0.99, 0.9, 0.8), start=0.99):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2  # two steps per pass
    built = []
    schedule = ProtectionSchedule(built.append, levels, start)
    rates = []

    def make_optimizer(lr):
        rates.append(lr)
        return torch.optim.SGD(model.parameters(), lr=lr)

    objective = lambda step: nn.functional.cross_entropy(step.outputs, step.targets)  # noqa: E731
    result = loop.run(model, batches, make_optimizer, 0.1, objective, rule or StopRule(max_epochs=20), schedule,
                      Scripted(script))
    return result, built, rates, schedule, model


def test_stops_when_forgotten():
    result, built, rates, _, _ = setup([(50.0, 0.0, False), (0.0, 0.0, False)])
    assert result.reason == "forgotten" and result.steps == 4 and len(result.trajectory) == 2
    assert result.trajectory[-1].event == "forgotten" and built == [] and rates == [0.1]


class Erasing(Scripted):
    """Forgotten from the first check; the forget features' outside share falls 10 % a check."""

    def __init__(self):
        super().__init__([(0.0, 0.0, False)])
        self.features = lambda model: 0.9 ** self.calls


@pytest.mark.parametrize("cap, checks", [(None, 20), (0, 1), (3, 4)])
def test_feature_erasure_goes_on_after_forgetting_until_its_cap(cap, checks):
    """Erasure continues while the share keeps falling (10 % a check > the 5 % progress asked),
    here until the 20-pass budget; ``max_erasure_checks`` caps the checks spent on it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    schedule = ProtectionSchedule(lambda threshold: None, (0.99,), 0.99)
    objective = lambda step: nn.functional.cross_entropy(step.outputs, step.targets)  # noqa: E731
    rule = StopRule(max_epochs=20, feature_target=0.01, max_erasure_checks=cap)
    result = loop.run(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), 0.1, objective, rule,
                      schedule, Erasing())
    assert len(result.trajectory) == checks
    assert result.reason == ("budget" if cap is None else "forgotten")


@pytest.mark.parametrize("strict", [True, False])
def test_a_strict_erasure_ends_at_the_first_guard_sample_it_costs_with_the_state_before(strict):
    """Forgotten at the first check with the guard at 0.5 points; erasure then costs nothing for two
    checks and one more sample at the fourth: a strict erasure stops there, returning the third
    check's state; otherwise the loss is noise the guard tolerates and the erasure goes on."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    states = []

    class Costly(Erasing):
        def guard_damage(self, m, tolerance=0.0):
            states.append(m.weight.detach().clone())
            self.calls += 1
            return (0.5 if self.calls < 4 else 1.0), False

    rule = StopRule(max_epochs=20, feature_target=0.01, max_erasure_checks=None, strict_erasure=strict)
    result = loop.run(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), 0.1,
                      lambda step: nn.functional.cross_entropy(step.outputs, step.targets), rule,
                      ProtectionSchedule(lambda threshold: None, (0.99,), 0.99), Costly())
    if strict:
        assert len(result.trajectory) == 4 and result.reason == "forgotten"
        assert result.trajectory[-1].event == "forgotten (erasure cost the guard)"
        assert torch.equal(model.weight, states[2])  # the third check's state, not the fourth's
    else:
        assert len(result.trajectory) == 20 and result.reason == "budget"


def test_a_strict_erasure_reads_its_reference_afresh_after_a_backoff():
    """Forgotten at the first check (guard 0.0); the second check backs off; the restored state
    reads 0.5 when next found forgotten: that is its reference, so the erasure goes on until the
    guard reads more than 0.5 (the fifth check), not at the third check against the stale 0.0."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    readings = [(0.0, False), (2.0, True), (0.5, False), (0.5, False), (1.0, False)]

    class BackingOff(Erasing):
        def guard_damage(self, m, tolerance=0.0):
            self.calls += 1
            return readings[min(self.calls, len(readings)) - 1]

    rule = StopRule(max_epochs=20, feature_target=0.01, max_erasure_checks=None, strict_erasure=True)
    result = loop.run(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), 0.1,
                      lambda step: nn.functional.cross_entropy(step.outputs, step.targets), rule,
                      ProtectionSchedule(lambda threshold: None, (0.99,), 0.99), BackingOff())
    assert [c.event for c in result.trajectory] == ["", "backoff", "", "", "forgotten (erasure cost the guard)"]


def test_significant_damage_backs_off_restores_and_halves_the_rate():
    result, built, rates, schedule, model = setup([(50.0, 0.0, False), (40.0, 2.0, True), (0.0, 0.0, False)])
    assert [c.event for c in result.trajectory] == ["", "backoff", "forgotten"]
    assert rates == [0.1, 0.05]
    assert built == [] and schedule.floor == schedule.start  # at the top level already: it stays, lr halved
    # damage that is not significant (a few borderline guard samples) does not back off
    result, *_ = setup([(50.0, 2.0, False), (0.0, 2.0, False)])
    assert [c.event for c in result.trajectory] == ["", "forgotten"]


def test_the_restored_state_is_the_last_one_that_passed_the_guard():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    states = []

    class Recording(Scripted):
        def guard_damage(self, m, tolerance=0.0):
            states.append(m.weight.detach().clone())
            return super().guard_damage(m, tolerance)

    loop.run(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), 0.5,
             lambda step: nn.functional.cross_entropy(step.outputs, step.targets), StopRule(max_epochs=3),
             ProtectionSchedule(None), Recording([(50.0, 0.0, False), (50.0, 5.0, True), (50.0, 0.0, False)]))
    # the third check measured the state restored to the first check's, plus one step at half the rate
    assert not torch.equal(states[1], states[0])
    step_after_restore = states[2] - states[0]
    assert 0 < float(step_after_restore.norm()) < float((states[1] - states[0]).norm())


def test_stalled_forgetting_lowers_the_protection_and_damage_raises_its_floor():
    script = [(60.0, 0.0, False), (59.0, 0.0, False), (59.0, 0.0, False),  # stalls twice: 0.99 -> 0.9
              (30.0, 3.0, True),  # damage at 0.9: back to 0.99, which becomes the floor
              (29.5, 0.0, False), (29.5, 0.0, False), (29.5, 0.0, False)]
    result, built, rates, schedule, _ = setup(script, StopRule(max_epochs=7))
    assert built == [0.9, 0.99]
    assert "lower protection" in [c.event for c in result.trajectory]
    assert schedule.floor == schedule.start and schedule.threshold == 0.99
    assert result.reason == "budget" and result.steps == 14


@pytest.mark.parametrize("stop_when_stalled", [False, True])
def test_forgetting_stalled_at_the_floor_stops_only_when_asked(stop_when_stalled):
    # levels 0.99 -> 0.9 -> 0.8 after two stalls each; then two more stalls at the floor
    script = [(60.0, 0.0, False)] + [(59.0, 0.0, False)] * 9
    result, built, *_ = setup(script, StopRule(max_epochs=10, stop_when_stalled=stop_when_stalled))
    assert built == [0.9, 0.8]
    if stop_when_stalled:
        assert result.reason == "stalled" and result.trajectory[-1].event == "stalled" and result.steps == 14
    else:
        assert result.reason == "budget" and result.steps == 20


def test_too_many_backoffs_stop_on_the_guard():
    result, *_ = setup([(50.0, 5.0, True)] * 10, StopRule(max_backoffs=2))
    assert result.reason == "guard" and [c.event for c in result.trajectory] == ["backoff"] * 2 + ["guard"]


def test_budget_in_steps():
    result, *_ = setup([(50.0, 0.0, False)] * 10, StopRule(max_steps=3, check_every=1))
    assert result.reason == "budget" and result.steps == 3


def test_schedule_ladder():
    built = []
    schedule = ProtectionSchedule(built.append, (0.99, 0.95, 0.9), start=0.95)
    assert schedule.levels == (0.99, 0.95, 0.9) and schedule.threshold == 0.95
    assert schedule.lower() and schedule.threshold == 0.9 and not schedule.lower()
    schedule.back_off()  # damage at 0.9: floor 0.95
    assert schedule.threshold == 0.95 and not schedule.lower()
    schedule.back_off()  # damage at the start level: one level up, floor stays the start
    assert schedule.threshold == 0.99 and built == [0.9, 0.95, 0.99]
    fixed = ProtectionSchedule(None, (0.99, 0.9), start=0.99)
    assert not fixed.lower() and fixed.threshold == 0.99
    with pytest.raises(ValueError, match="levels"):
        ProtectionSchedule(None, (1.5,), start=0.9)


@pytest.mark.parametrize("field,value", [("holdout", 1.0), ("guard", -0.1), ("tolerance", -1), ("max_epochs", 0),
                                         ("patience", 0), ("check_every", 0), ("max_steps", 0),
                                         ("max_erasure_checks", -1), ("confidence", 0.0), ("confidence", 1.0)])
def test_stop_rule_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        StopRule(**{field: value})


def test_guard_damage_counts_net_losses_against_the_original():
    guard = (torch.zeros(100, 1), torch.zeros(100, dtype=torch.long))

    def correct(model, data):
        return model(data[0])

    before = torch.ones(100, dtype=torch.bool)
    before[:10] = False
    monitor = Monitor(correct, [], guard, lambda x: before)
    now = before.clone()
    now[10:20] = False  # 10 lost
    now[:2] = True  # 2 won
    damage, significant = monitor.guard_damage(lambda x: now)
    assert damage == pytest.approx(8.0) and significant  # 8 > 2 sqrt(12)
    damage, significant = monitor.guard_damage(lambda x: now, tolerance=2.0)
    assert damage == pytest.approx(8.0) and not significant  # 8 - 2 < 2 sqrt(12): not clearly past 2 points
    now = before.clone()
    now[10:13] = False
    now[:1] = True
    damage, significant = monitor.guard_damage(lambda x: now)
    assert damage == pytest.approx(2.0) and not significant  # 2 < 2 sqrt(4)


def test_progress_lines_give_points_to_two_decimals():
    torch.manual_seed(0)
    model, lines = nn.Linear(3, 2), []
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    loop.run(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), 0.1,
             lambda step: nn.functional.cross_entropy(step.outputs, step.targets), StopRule(max_epochs=20),
             ProtectionSchedule(lambda threshold: None, (0.99,), 0.99),
             Scripted([(100 / 13, 0.25, False), (0.0, 0.0, False)]), progress=lines.append)
    assert lines[0] == "unlearn: step 2, threshold 0.99, forget 7.69, guard damage 0.25"
    assert lines[-1].endswith("forget 0.00, guard damage 0.00, forgotten")


def test_progress_of_an_unmeasured_unprojected_run_gives_its_loss_not_a_threshold():
    """No stop rule and no projection (a naive baseline): no threshold, and the pass's mean loss
    instead of "forget not measured, guard damage not measured"."""
    torch.manual_seed(0)
    model, lines = nn.Linear(3, 2), []
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    result = loop.run(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), 0.1,
                      lambda step: nn.functional.cross_entropy(step.outputs, step.targets),
                      StopRule(max_epochs=3), ProtectionSchedule.off(), None, progress=lines.append)
    assert len(lines) == 3 and all(c.threshold is None for c in result.trajectory)
    assert lines == [f"unlearn: step {2 * (i + 1)}, loss {loss:.4f}" for i, loss in enumerate(result.losses)]
    schedule = ProtectionSchedule.off()
    assert schedule.threshold is None and not schedule.lower()
    schedule.back_off()  # nothing to move
    assert schedule.threshold is None
