"""The sub-class, memorised and sequential deletion requests (issue 16.4): which samples each
forgets, the coarse labels, the memorisation ranking, a sequence applied request by request,
and one small end-to-end comparison per scenario."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from unsc_fast.evaluation import cli
from unsc_fast.evaluation.compare import CompareConfig, ConfigError, load_data, run_comparison
from unsc_fast.evaluation.data import DatasetSplit
from unsc_fast.evaluation.memorisation import MemorisationSettings, memorisation_scores
from unsc_fast.evaluation.methods import UnlearningMethod, get_method
from unsc_fast.evaluation.methods import retrain as retrain_module
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.evaluation.scenario import COARSE_GROUPS, coarse_class, make_scenario, memorised, sequential, sub_class
from unsc_fast import NullSpaceProjector

from evaluation_helpers import tiny_digits


@pytest.fixture(scope="module")
def tiny():
    """(10-class split, its trained DigitsCNN(width=8)) on 30 training digits per class."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny convolutions run fastest single-threaded
    split, model, _, _ = tiny_digits(3)
    yield split, model
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- sub-class
def test_sub_class_trains_on_coarse_labels_and_forgets_every_sample_of_the_fine_label(tiny):
    split, _ = tiny
    scenario = make_scenario(split, "sub-class", forget_classes=(3,))
    assert scenario.kind == "sub_class" and scenario.fine_label == 3 and scenario.forget_classes == ()
    assert scenario.num_classes == 5 and scenario.split.class_names == ("0/6", "1/7", "2/5", "3/8", "4/9")
    for fine, coarse in zip(split.y_train.tolist(), scenario.split.y_train.tolist()):
        assert fine in COARSE_GROUPS[coarse]
    assert torch.equal(scenario.forget_train_mask, split.y_train == 3)
    assert torch.equal(scenario.forget_test_mask, split.y_test == 3)
    assert set(scenario.forget[1].tolist()) == {coarse_class(3)} == {3}
    assert set(scenario.forget_test[1].tolist()) == {3}  # scored against the coarse label 3/8
    remain_coarse = scenario.remain[1]
    assert int((remain_coarse == 3).sum()) == int((split.y_train == 8).sum())  # the 8s stay in 3/8
    assert len(scenario.remain[1]) == len(split.y_train) - 30
    assert split.y_train.max() == 9  # the caller's split is not relabelled in place
    assert "fine label 3 (coarse class 3/8)" in scenario.describe()


def test_sub_class_refuses_bad_input_naming_the_argument(tiny):
    split, _ = tiny
    with pytest.raises(ValueError, match="forget_classes: sub-class forgetting takes one fine label"):
        make_scenario(split, "sub_class", forget_classes=(3, 5))
    with pytest.raises(ValueError, match="forget_classes: .*fine label in 0..9"):
        sub_class(split, 10)
    five = DatasetSplit(split.x_train, split.y_train % 5, split.x_test, split.y_test % 5, num_classes=5)
    with pytest.raises(ValueError, match="needs a digit dataset"):
        sub_class(five, 3)


def test_unsc_unlearns_a_sub_class_with_labels_outside_the_coarse_class(tiny):
    """UNSC is allowed for a sub-class: it moves the digit out of its coarse class while the
    retained classes keep most of their accuracy (the projection has room: no NoRoomError)."""
    split, _ = tiny
    scenario = make_scenario(split, "sub_class", forget_classes=(3,))
    torch.manual_seed(0)
    from unsc_fast.evaluation.models import DigitsCNN
    from unsc_fast.evaluation.recipes import train

    original = train(DigitsCNN(num_classes=5, width=8), scenario.split.x_train, scenario.split.y_train, epochs=15, seed=0)
    assert accuracy(original, *scenario.forget) == 100
    result = get_method("unsc")(original, scenario, {"lr": 0.03}, seed=0)  # 30 forget samples: 10 steps
    assert not bool((result.info["forget_labels"] == 3).any())  # never the own coarse class
    assert accuracy(result.model, *scenario.forget) < 20
    assert accuracy(result.model, *scenario.remain) > 90
    assert get_method("unsc").supports("sub_class") and not get_method("unsc").supports("memorised")
    assert result.settings["threshold"] == 0.99  # the sub-class default: protects the sibling digit 8


def test_unsc_takes_its_sub_class_threshold_only_there_and_an_explicit_one_wins():
    unsc = get_method("unsc")
    assert unsc.settings(None, "full_class")["threshold"] == unsc.settings()["threshold"] == 0.99
    assert unsc.settings(None, "sub_class")["threshold"] == 0.99
    assert unsc.settings({"threshold": 0.97}, "sub_class")["threshold"] == 0.97
    assert get_method("finetune").settings(None, "sub_class") == get_method("finetune").settings()


# ---------------------------------------------------------------------------- memorised
def _outlier_data(n_per_class: int = 20):
    """Two clusters (label 0 left, label 1 right) and sample 0: in the left cluster, labelled 1.
    A model that trained on sample 0 can fit it; one that did not calls it 0: memorised."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(n_per_class, 2, generator=generator) * 0.3 + torch.tensor([-2.0, 0.0])
    right = torch.randn(n_per_class, 2, generator=generator) * 0.3 + torch.tensor([2.0, 0.0])
    x = torch.cat([torch.tensor([[-2.0, 1.5]]), left, right])
    y = torch.cat([torch.tensor([1]), torch.zeros(n_per_class, dtype=torch.long), torch.ones(n_per_class, dtype=torch.long)])
    return x, y


def _mlp():
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def test_memorisation_ranks_the_mislabelled_sample_first_and_repeats():
    x, y = _outlier_data()
    settings = MemorisationSettings(shadows=4, epochs=150, seed=0)
    mem, gap = memorisation_scores(_mlp, x, y, settings)
    assert mem[0] == pytest.approx(1.0)              # always right when trained on, never otherwise
    assert np.abs(mem[1:]).max() <= 0.5 and mem[1:].mean() < 0.05
    assert gap[0] > 0.5
    again = memorisation_scores(_mlp, x, y, settings)
    assert np.array_equal(mem, again[0]) and np.array_equal(gap, again[1])  # seeded: the same ranking
    split = DatasetSplit(x, y, x[:4], y[:4], num_classes=2)
    scenario = memorised(split, 1 / len(y), mem, gap)
    assert scenario.kind == "memorised" and torch.nonzero(scenario.forget_train_mask).flatten().tolist() == [0]
    assert not bool(scenario.forget_test_mask.any())
    assert "most memorised samples (memorisation 1.00 to 1.00)" in scenario.describe()


def test_memorised_takes_the_top_fraction_ties_by_the_confidence_gap_then_index():
    x, y = torch.zeros(10, 2), torch.zeros(10, dtype=torch.long)
    split = DatasetSplit(x, y, x[:2], y[:2], num_classes=2)
    scores = np.array([0, .5, 0, .5, 1, 0, 0, .5, 0, 0])
    gap = np.array([0, .1, 0, .3, 0, 0, 0, .1, 0, 0])
    chosen = memorised(split, 0.3, scores, gap).forget_train_mask
    assert torch.nonzero(chosen).flatten().tolist() == [1, 3, 4]  # 4 (1.0), 3 (.5, gap .3), 1 (.5, gap .1, index 1 < 7)
    with pytest.raises(ValueError, match="forget_fraction must be in"):
        memorised(split, 0.0, scores)
    with pytest.raises(ValueError, match="one per training sample"):
        memorised(split, 0.3, scores[:5])
    with pytest.raises(ValueError, match="memorisation_shadows must be an even number"):
        MemorisationSettings(shadows=3)
    with pytest.raises(ValueError, match="memorisation_epochs must be at least 1"):
        MemorisationSettings(epochs=0)


# ---------------------------------------------------------------------------- sequential
def test_sequential_stages_forget_each_class_on_the_data_still_held(tiny):
    split, _ = tiny
    scenario = make_scenario(split, "sequential", forget_classes=(3,), then_forget=(5,))
    assert scenario.kind == "sequential" and scenario.forget_classes == (3, 5)
    assert torch.equal(scenario.forget_train_mask, (split.y_train == 3) | (split.y_train == 5))
    assert set(scenario.remain[1].tolist()).isdisjoint({3, 5}) and set(scenario.forget_test[1].tolist()) == {3, 5}
    first, second = scenario.stages
    assert (first.kind, first.step, first.forget_classes, first.new_classes) == ("full_class", 0, (3,), (3,))
    assert set(first.forget[1].tolist()) == {3} and len(first.remain[1]) == 270
    assert (second.step, second.forget_classes, second.new_classes) == (1, (3, 5), (5,))
    assert 3 not in second.split.y_train.tolist()  # the first request's data is deleted
    assert set(second.forget[1].tolist()) == {5} and len(second.remain[1]) == 240
    assert "class 3, then class 5" in scenario.describe()
    assert [s.new_classes for s in sequential(split, (1, 2), (3, 4)).stages] == [(1, 2), (3,), (4,)]


def test_sequential_refuses_bad_input_naming_the_argument(tiny):
    split, _ = tiny
    with pytest.raises(ValueError, match="then_forget: sequential forgetting needs at least one further request"):
        make_scenario(split, "sequential", forget_classes=(3,), then_forget=())
    with pytest.raises(ValueError, match="then_forget: a class is requested twice"):
        make_scenario(split, "sequential", forget_classes=(3,), then_forget=(5, 3))
    with pytest.raises(ValueError, match=r"forget_classes/then_forget: classes \[12\] are outside"):
        make_scenario(split, "sequential", forget_classes=(3,), then_forget=(12,))


def _counting_method(calls):
    """A method that records each request and adds one to a counter buffer of the model."""
    def run(model, scenario, settings, seed, progress):
        calls.append((scenario.step, scenario.forget_classes, tuple(scenario.forget[1].unique().tolist()),
                      float(model.count), scenario.carry))
        model.count += 1
        return {"carry": f"after step {scenario.step}"}
    return UnlearningMethod("counting", "counting", run, {})


class _Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        return torch.zeros(len(x), 10)


def test_a_method_is_applied_once_per_request_to_the_previous_result(tiny):
    split, _ = tiny
    scenario = make_scenario(split, "sequential", forget_classes=(3,), then_forget=(5, 7))
    calls = []
    original = _Counted()
    result = _counting_method(calls)(original, scenario, seed=0)
    assert [c[:4] for c in calls] == [(0, (3,), (3,), 0.0), (1, (3, 5), (5,), 1.0), (2, (3, 5, 7), (7,), 2.0)]
    assert [c[4] for c in calls] == [None, "after step 0", "after step 1"]  # each request gets the last one's carry
    assert float(result.model.count) == 3 and float(original.count) == 0
    assert [stage["forget_classes"] for stage in result.info["stages"]] == [[3], [5], [7]]
    assert result.carry is None and "carry" not in result.info["stages"][0]


def test_retrain_runs_once_without_every_requested_class(tiny, monkeypatch):
    split, model = tiny
    scenario = make_scenario(split, "sequential", forget_classes=(3,), then_forget=(5,))
    seen = []
    monkeypatch.setattr(retrain_module, "train", lambda model, x, y, **kwargs: seen.append(set(y.tolist())))
    get_method("retrain")(model, scenario, seed=0)
    assert seen == [set(range(10)) - {3, 5}]


def test_unsc_reuses_the_first_requests_statistics_for_the_second(tiny, monkeypatch):
    split, model = tiny
    scenario = make_scenario(split, "sequential", forget_classes=(3,), then_forget=(5,))
    observed = []
    collect = NullSpaceProjector.collect

    def counting_collect(self, *args, **kwargs):
        observed.append(kwargs.get("labels"))
        return collect(self, *args, **kwargs)

    built = []
    build = NullSpaceProjector.build

    def recording_build(self, *args, **kwargs):
        built.append((sorted(self.groups), list(kwargs.get("exclude", ()))))
        return build(self, *args, **kwargs)

    monkeypatch.setattr(NullSpaceProjector, "collect", counting_collect)
    monkeypatch.setattr(NullSpaceProjector, "build", recording_build)
    result = get_method("unsc")(model, scenario, dict(threshold=0.97, epochs=10, lr=0.03), seed=0)
    assert len(observed) == 1  # one pass over the remaining data, in the first request only
    kept = sorted(set(range(10)) - {3})
    # the second request: the same statistics, class 5 left out (each request may rebuild at
    # other protection levels: the same request again)
    assert built[0] == (kept, []) and built[-1] == (kept, [5])
    assert {(tuple(g), tuple(e)) for g, e in built} == {(tuple(kept), ()), (tuple(kept), (5,))}
    assert [stage["reused_statistics"] for stage in result.info["stages"]] == [False, True]
    labels = result.info["stages"][1]["forget_labels"]
    assert not bool(torch.isin(labels, torch.tensor([3, 5])).any())  # calibration skips both classes
    assert accuracy(result.model, *scenario.forget) < 20 and accuracy(result.model, *scenario.remain) > 80


# ---------------------------------------------------------------------------- end to end
def _run(tmp_path, *arguments):
    """``unsc-fast compare`` on the digits with UNSC, fine-tune and retrain, one seed, a few epochs
    (5-8 s): its JSON and markdown report."""
    threads = torch.get_num_threads()
    try:
        code = cli.main(["compare", "--methods", "unsc,finetune", "--seeds", "0", "--train-epochs", "3",
                         "--set", "unsc.epochs=2", "--set", "finetune.epochs=1", "--output", str(tmp_path), "--quiet",
                         *arguments])
    finally:
        torch.set_num_threads(threads)  # the CLI sets one thread on the digits
    assert code == 0
    return json.loads((tmp_path / "comparison.json").read_text()), (tmp_path / "comparison.md").read_text()


def test_compare_sub_class_end_to_end(tmp_path):
    results, report = _run(tmp_path, "--scenario", "sub-class")
    assert "sub-class forgetting of fine label 3 (coarse class 3/8)" in report
    assert results["dataset"]["num_classes"] == 5 and results["dataset"]["class_names"][3] == "3/8"
    assert results["scenario"]["kind"] == "sub_class" and results["scenario"]["forget_train"] == 128
    assert results["scenario"]["forget_test"] == 55
    assert set(results["runs"]) == {"retrain", "unsc", "finetune", "original"}
    assert len(results["runs"]["unsc"][0]["metrics"]["per_class_test"]) == 5
    assert not np.isnan(results["runs"]["retrain"][0]["metrics"]["acc_forget_test"])
    assert results["runs"]["unsc"][0]["settings"]["threshold"] == 0.99


def test_compare_memorised_end_to_end(tmp_path):
    results, report = _run(tmp_path, "--scenario", "memorised", "--memorisation-shadows", "2",
                           "--memorisation-epochs", "2")
    assert "memorised forgetting of the 5% most memorised samples" in report
    assert results["config"]["memorisation_shadows"] == 2
    assert results["config"]["forget_fraction"] == 0.05 and results["scenario"]["forget_train"] == 63
    assert "unsc cannot do memorised forgetting" in results["skipped"]["unsc"]
    assert set(results["runs"]) == {"retrain", "finetune", "original"}


def test_compare_sequential_end_to_end(tmp_path):
    results, report = _run(tmp_path, "--scenario", "sequential", "--forget-classes", "3", "--then-forget", "5")
    assert "sequential forgetting of class 3, then class 5" in report
    assert results["scenario"]["forget_classes"] == [3, 5] and results["scenario"]["forget_train"] == 255
    unsc = results["runs"]["unsc"][0]
    assert [stage["forget_classes"] for stage in unsc["info"]["stages"]] == [[3], [5]]
    assert "stages" not in results["runs"]["retrain"][0]["info"]
    assert results["runs"]["retrain"][0]["metrics"]["acc_forget_train"] == 0.0  # never saw 3 or 5


@pytest.mark.parametrize("arguments, message", [
    (["--scenario", "sub-class", "--forget-classes", "3", "8"], "sub-class forgetting forgets one fine label"),
    (["--scenario", "memorised", "--memorisation-shadows", "3"], "--memorisation-shadows must be an even number"),
    (["--scenario", "memorised", "--forget-fraction", "1.5"], "--forget-fraction must be in"),
    (["--scenario", "sequential", "--then-forget"], "expected at least one argument"),
    (["--scenario", "sequential", "--then-forget", "3"], "then_forget: a class is requested twice"),
    (["--scenario", "sub-class", "--dataset", "mnist1d", "--forget-classes", "11"], "fine label in 0..9"),
    (["--forget-classes", "12"], "forget_classes: classes [12] are outside 0..9"),
    (["--forget-classes", *map(str, range(10))], "cannot forget every class"),
    (["--scenario", "random-sample", "--forget-fraction", "0.9999"], "leaves no remaining sample"),
    (["--validation-split", "1.0"], "validation_split: a share of the training data in [0, 1)"),
    (["--validation-split", "0.1", "--checkpoint", "missing.pt"], "it needs an original trained here"),
])
def test_the_command_line_refuses_bad_values_before_training(tmp_path, arguments, message, capsys):
    threads = torch.get_num_threads()
    try:
        code = cli.main(["compare", "--methods", "unsc", "--seeds", "0", "--quiet", "--output", str(tmp_path),
                         *arguments])
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    finally:
        torch.set_num_threads(threads)
    assert code == 2 and message in capsys.readouterr().err


def test_config_check_names_then_forget(tmp_path):
    with pytest.raises(ConfigError, match="--then-forget"):
        run_comparison(CompareConfig(scenario="sequential", then_forget=(), methods=("unsc",), output=str(tmp_path)))


# ---------------------------------------------------------------------------- validation part, the guard
def test_validation_part_moves_a_share_of_every_class_out_of_training(tiny):
    from unsc_fast.evaluation.data import validation_part

    split, _ = tiny
    parted = validation_part(split, 0.1, seed=4)
    assert len(parted.y_train) + len(parted.y_val) == len(split.y_train)
    for label in range(10):
        assert int((parted.y_val == label).sum()) == round(0.1 * int((split.y_train == label).sum()))
    train_rows = {tuple(row.flatten().tolist()) for row in parted.x_train}
    assert not any(tuple(row.flatten().tolist()) in train_rows for row in parted.x_val)
    assert torch.equal(parted.x_test, split.x_test)  # the test split is untouched
    assert torch.equal(validation_part(split, 0.1, seed=4).y_val, parted.y_val)
    with pytest.raises(ValueError, match="validation fraction"):
        validation_part(split, 1.0)


def test_validation_draws_are_the_library_s_per_class_draw_and_keep_small_classes_on_both_sides():
    from unsc_fast.evaluation.data import DatasetSplit, holdout_split
    from unsc_fast.unlearning.data import held_out

    y = torch.tensor([0] * 40 + [1] * 3 + [2] * 2)  # 10 % of three or two rounds to none
    split = DatasetSplit(torch.arange(len(y)).float()[:, None], y, torch.zeros(1, 1), torch.zeros(1).long(), 3, "toy")
    parted = holdout_split(split, 0.1, seed=5)
    assert torch.equal(parted.y_test.sort().values, y[held_out(y, 0.1, torch.Generator().manual_seed(5))].sort().values)
    for label, count in ((0, 4), (1, 1), (2, 1)):  # every class in both parts
        assert int((parted.y_test == label).sum()) == count
        assert int((parted.y_train == label).sum()) > 0


def test_a_scenario_guards_with_the_validation_part_of_the_classes_that_stay(tiny):
    from unsc_fast.evaluation.data import validation_part
    from unsc_fast.evaluation.scenario import full_class

    split, _ = tiny
    assert full_class(split, [3]).guard is None  # no validation part: no held-out guard
    parted = validation_part(split, 0.2, seed=0)
    x, y = full_class(parted, [3, 8]).guard
    keep = (parted.y_val != 3) & (parted.y_val != 8)
    assert torch.equal(y, parted.y_val[keep]) and torch.equal(x, parted.x_val[keep])
    stages = sequential(parted, [3], [8]).stages
    assert set(stages[1].guard[1].tolist()) == set(range(10)) - {3, 8}  # later stages exclude every class so far
    assert sub_class(parted, 3).guard is None  # coarse labels: no class-wise guard
    assert set(sub_class(parted, 3).split.y_val.tolist()) <= set(range(len(COARSE_GROUPS)))


@pytest.mark.parametrize("guard, expected", [("validation", True), ("train", False)])
def test_unsc_gives_unlearn_the_scenarios_held_out_guard(tiny, monkeypatch, guard, expected):
    from unsc_fast.evaluation.data import validation_part
    from unsc_fast.evaluation.methods import unsc as unsc_module
    from unsc_fast.evaluation.scenario import full_class

    split, model = tiny
    scenario = full_class(validation_part(split, 0.2, seed=0), [3])
    seen, real_unlearn = [], unsc_module.unlearn

    def spy(*args, **kwargs):
        seen.append(kwargs.get("guard"))
        return real_unlearn(*args, **kwargs)

    monkeypatch.setattr(unsc_module, "unlearn", spy)
    get_method("unsc")(model, scenario, {"guard": guard, "epochs": 1}, seed=0)
    if expected:
        assert seen[0] is not None and torch.equal(seen[0][1], scenario.guard[1])
    else:
        assert seen[0] is None
    with pytest.raises(ValueError, match="guard must be one of"):
        get_method("unsc")(model, scenario, {"guard": "test"}, seed=0)


def test_compare_with_a_validation_split_trains_without_it_and_guards_with_it(tmp_path, monkeypatch):
    from unsc_fast.evaluation.methods import unsc as unsc_module

    guards, real_unlearn = [], unsc_module.unlearn

    def spy(*args, **kwargs):
        guards.append(kwargs.get("guard"))
        return real_unlearn(*args, **kwargs)

    monkeypatch.setattr(unsc_module, "unlearn", spy)
    config = CompareConfig(methods=("unsc",), seeds=(0,), train_epochs=1, validation_split=0.1, output=str(tmp_path),
                           settings={"unsc": {"epochs": 1}})
    results = run_comparison(config)
    full = load_data(CompareConfig(output=str(tmp_path)))
    parted = load_data(config)
    assert len(parted.y_train) + len(parted.y_val) == len(full.y_train)
    assert results["scenario"]["forget_train"] == int((parted.y_train == 3).sum())  # the part is out of training
    x, y = guards[0]
    assert torch.equal(y, parted.y_val[parted.y_val != 3]) and torch.equal(x, parted.x_val[parted.y_val != 3])
    assert results["config"]["validation_split"] == 0.1
