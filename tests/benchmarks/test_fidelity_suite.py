"""The fidelity suite (benchmarks/fidelity_suite.py): its cases, the issue-27 targets it checks,
the validation split it can report on, and a smoke run on a tiny configuration."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import fidelity_suite
from benchmarks.fidelity_targets import averages, averages_table, checks, gap_verdict, reference_remain, worst_cases
from unsc_fast.evaluation.data import load_digits_split, holdout_split
from unsc_fast.evaluation.models import create_model


def test_quick_cases_cover_every_kind_for_the_named_classes():
    keys = [case.key for case in fidelity_suite.cases(["digits"], ["digits_mlp"], [0], [3, 8], fidelity_suite.KINDS)]
    assert keys == ["digits-digits_mlp-s0-full-3", "digits-digits_mlp-s0-full-8", "digits-digits_mlp-s0-pair-3_8",
                    "digits-digits_mlp-s0-sub-3", "digits-digits_mlp-s0-sub-8", "digits-digits_mlp-s0-seq-3_8"]
    everything = fidelity_suite.cases(["digits", "mnist1d"], None, [0, 1, 2], range(10), fidelity_suite.KINDS)
    assert len(everything) == 2 * 2 * 3 * (10 + len(fidelity_suite.PAIRS) + 10 + len(fidelity_suite.SEQUENCES))


def figures(remain, forget, probe, relearn):
    return {"acc_remain": remain, "acc_forget": forget, "probe_forget": probe, "relearn_forget": relearn, "seconds": 1.0}


def record(kind="full", dataset="mnist1d", **methods):
    models = {"original": figures(90.0, 80.0, 80.0, 70.0), "retrain": figures(91.0, 0.0, 60.0, 10.0),
              "logit_suppression": figures(90.5, 0.0, 80.0, 70.0), **methods}
    return {"dataset": dataset, "kind": kind, "models": models, "not_run": {}, "case_seconds": 1.0}


def test_targets_are_checked_as_the_issue_states_them():
    good = checks(record(unsc=figures(89.2, 0.5, 70.0, 34.0)), "unsc")
    assert good["forget"] == (0.5, True)
    assert good["remain"] == (pytest.approx(-0.8), True)       # MNIST-1D: 1 point of tolerance
    assert good["relearn"] == (24.0, True)                      # within 25 of retrain's 10
    assert good["probe"] == (0.5, True)                         # half of the way from 80 to 60
    assert good["suppression"] == (2.0, True)                   # closer than 80 / 70 on both
    assert good["gap"][0] == pytest.approx((1.8 + 0.5 + 10.0 + 24.0) / 4)
    bad = checks(record(dataset="digits", unsc=figures(89.2, 1.5, 82.0, 36.0)), "unsc")
    assert [bad[key][1] for key in ("forget", "remain", "relearn", "probe", "suppression")] == [False] * 5
    assert bad["probe"][0] == pytest.approx(-0.1)  # moved away from the retrained model


def test_targets_that_do_not_apply_are_not_counted():
    same = record(unsc=figures(90.0, 0.0, 79.0, 12.0))
    same["models"]["retrain"]["probe_forget"] = 77.0                 # original and retrain within 5 points
    same["models"]["logit_suppression"]["relearn_forget"] = 13.0     # suppression already near retrain
    result = checks(same, "unsc")
    assert math.isnan(result["probe"][0]) and result["probe"][1] is None
    assert result["suppression"] == (0.0, None)  # neither figure of the baseline is >= 5 points off
    sub = record(kind="sub", unsc=figures(90.0, 6.0, 70.0, 10.0))
    sub["models"]["retrain"]["acc_forget"] = 5.5                     # a retrained model keeps some of the digit
    assert checks(sub, "unsc")["forget"] == (6.0, True)


def test_worst_cases_and_the_gap_verdict():
    records = [record(unsc=figures(89.2, 0.5, 70.0, 34.0), natmu=figures(90.0, 0.0, 80.0, 70.0)),
               record(unsc=figures(85.0, 0.0, 62.0, 12.0), natmu=figures(91.0, 0.0, 60.0, 10.0))]
    worst = worst_cases(records)
    assert worst["unsc"]["remain"] == {"worst": -5.0, "failed": 1, "checked": 2}
    assert worst["unsc"]["relearn"]["worst"] == 24.0 and worst["natmu"]["probe"]["failed"] == 1
    assert "original" not in worst and "retrain" not in worst
    assert "smaller" in gap_verdict(worst) and "NOT" not in gap_verdict(worst)


def test_the_retrained_models_own_acc_r_misses_are_counted_against_each_datasets_tolerance():
    records = [record(), record(dataset="digits"), record(), record()]
    records[1]["models"]["retrain"]["acc_remain"] = 89.4   # digits: -0.6 from 90 is past 0.5
    records[2]["models"]["retrain"]["acc_remain"] = 89.2   # MNIST-1D: -0.8 is within 1.0
    records[3]["models"]["retrain"]["acc_remain"] = 88.5   # -1.5 is past it
    assert reference_remain(records) == "The retrained model itself is past the Acc_r tolerance on 2 of 4 cases (worst -1.5)."


def test_averages_are_means_over_the_cases():
    records = [record(unsc=figures(89.0, 1.0, 70.0, 30.0)), record(unsc=figures(85.0, 0.0, 62.0, 12.0))]
    average = averages(records)
    assert average["unsc"]["remain_drop"] == pytest.approx(-3.0)  # (-1 - 5) / 2 from the original's 90
    assert average["unsc"]["acc_forget"] == pytest.approx(0.5) and average["unsc"]["relearn_forget"] == pytest.approx(21.0)
    assert average["unsc"]["gap"] == pytest.approx(np.mean([checks(r, "unsc")["gap"][0] for r in records]))
    assert math.isnan(average["retrain"]["gap"]) and average["original"]["remain_drop"] == 0.0
    assert "| unsc | 2 | -3.0 | 0.5 | 66.0 | 21.0 |" in averages_table(average)


def test_the_validation_split_holds_out_a_fifth_of_every_class_of_the_training_data():
    split = load_digits_split()
    held = holdout_split(split, 0.2, seed=1)
    assert len(held.y_train) + len(held.y_test) == len(split.y_train)
    for label in range(10):
        total = int((split.y_train == label).sum())
        assert int((held.y_test == label).sum()) == round(0.2 * total)
    rows = {tuple(row.flatten().tolist()) for row in held.x_train}
    assert not any(tuple(row.flatten().tolist()) in rows for row in held.x_test)
    assert torch.equal(holdout_split(split, 0.2, seed=1).x_test, held.x_test)
    assert not torch.equal(holdout_split(split, 0.2, seed=2).x_test, held.x_test)


def test_digits_mlp_is_64_128_64_10():
    model = create_model("digits_mlp", 10, (1, 8, 8))
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(64, 128), (128, 64), (64, 10)]
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.slow  # three end-to-end runs of the suite on 4 tiny cases (~10 s of CPU)
def test_a_quick_run_on_a_tiny_configuration_writes_every_case_and_reuses_them(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    options = ["--datasets", "digits", "--models", "digits_mlp", "--methods", "unsc", "logit_suppression",
               "--train-epochs", "2", "--out", str(tmp_path)]
    try:
        assert fidelity_suite.main(options + ["--quick", "--kinds", "full", "sub"]) == 0
        first = json.loads((tmp_path / "results.json").read_text())
        printed = capsys.readouterr().out
        assert fidelity_suite.main(options + ["--quick", "--kinds", "full", "sub"]) == 0  # all read back, none run
        again = json.loads((tmp_path / "results.json").read_text())["cases"]
        monkeypatch.setattr(fidelity_suite, "code_version", lambda: "changed")  # new library code: run again
        assert fidelity_suite.main(options + ["--seeds", "0", "--classes", "3", "--kinds", "full"]) == 0
        rerun = json.loads((tmp_path / "results.json").read_text())["cases"]
    finally:
        torch.set_num_threads(threads)
    assert "[4/4] digits/digits_mlp seed 0: forget digit 8 (coarse pairs)" in printed
    assert "| unsc | 4 | 0 |" in printed and "| logit_suppression | 2 | 2 |" in printed
    cases = first["cases"]
    assert [case["key"] for case in cases] == ["digits-digits_mlp-s0-full-3", "digits-digits_mlp-s0-full-8",
                                               "digits-digits_mlp-s0-sub-3", "digits-digits_mlp-s0-sub-8"]
    assert set(cases[0]["models"]) == {"original", "retrain", "unsc", "logit_suppression"}
    assert "cannot do sub-class" in cases[2]["not_run"]["logit_suppression"]
    assert cases[0]["models"]["logit_suppression"]["acc_forget"] == 0.0
    assert again == cases
    assert rerun[0]["key"] == cases[0]["key"] and rerun[0]["case_seconds"] != cases[0]["case_seconds"]
    assert rerun[0]["models"]["original"] == cases[0]["models"]["original"]  # the cached original, same figures
    for name in ("summary.md", "cases.md", "table.md"):
        assert (tmp_path / name).read_text().startswith(("# Fidelity suite", "| case", "| request"))
    assert len(list((tmp_path / "originals").glob("*.pt"))) == 2  # fine and coarse labels, seed 0


def test_the_report_reads_stored_cases_of_one_code_version_and_the_named_kinds(tmp_path):
    from benchmarks.fidelity_report import report, stored_cases
    (tmp_path / "cases").mkdir()
    for name, kind, code in (("a", "full", "new"), ("b", "pair", "new"), ("c", "sub", "new"), ("d", "full", "old")):
        case = record(kind=kind, unsc=figures(89.0, 0.0, 70.0, 30.0))
        case.update(seed=0, signature={"split": "test", "code": code})
        (tmp_path / "cases" / f"{name}.json").write_text(json.dumps(case))
    by_dataset = stored_cases(tmp_path, ["full", "pair"], "test", None)
    assert [len(records) for records in by_dataset.values()] == [2]  # "new" is the most common; no sub
    assert "#### mnist1d: 2 requests (full, pair), seeds 0" in report(by_dataset)
    assert [len(r) for r in stored_cases(tmp_path, ["full"], "test", "old").values()] == [1]


def test_the_cost_table_is_each_methods_time_over_the_same_requests_retraining():
    from benchmarks.fidelity_report import cost_table
    records = []
    for unsc_seconds, retrain_seconds in ((1.0, 4.0), (3.0, 4.0)):  # ratios 0.25 and 0.75: mean 0.50
        case = record(unsc=dict(figures(89.0, 0.0, 70.0, 30.0), seconds=unsc_seconds))
        case["models"]["retrain"] = dict(case["models"]["retrain"], seconds=retrain_seconds)
        records.append(dict(case, model="mnist1d_cnn"))
    table = cost_table({"mnist1d": records})
    assert "| model | requests | logit_suppression / retraining | unsc / retraining |" in table
    assert "| mnist1d_cnn | 2 | 0.25 | 0.50 |" in table  # suppression: 1 s over 4 s on both requests


def test_ablation_runner_scores_a_variant_and_can_guard_with_held_out_data(tmp_path, monkeypatch):
    from benchmarks import fidelity_ablation

    seen = []
    real_unlearn = fidelity_ablation.unlearn

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_unlearn(*args, **kwargs)

    monkeypatch.setattr(fidelity_ablation, "unlearn", spy)
    common = ["--dataset", "digits", "--models", "digits_mlp", "--classes", "3", "--train-epochs", "2",
              "--stored", str(tmp_path), "--set", "epochs=2", "--set", "threshold=0.98"]
    assert fidelity_ablation.main(common + ["--name", "train"]) == 0
    assert fidelity_ablation.main(common + ["--name", "heldout", "--guard", "heldout"]) == 0
    assert "guard" not in seen[0] and seen[0]["epochs"] == 2 and seen[0]["threshold"] == 0.98
    guard_x, guard_y = seen[1]["guard"]
    split = holdout_split(load_digits_split(), fidelity_suite.VALIDATION_FRACTION, 0)
    even = torch.arange(len(split.y_test)) % 2 == 0
    assert torch.equal(guard_y, split.y_test[even & (split.y_test != 3)])  # the even half, remaining classes only
    assert torch.equal(guard_x, split.x_test[even & (split.y_test != 3)])
    train, heldout = ([json.loads(line) for line in (tmp_path / f"ablation-{name}.jsonl").read_text().splitlines()]
                      for name in ("train", "heldout"))
    assert len(train) == len(heldout) == 1 and train[0]["classes"] == [3] and heldout[0]["guard"] == "heldout"
    # the same original, scored on the same odd half by both variants
    assert train[0]["original_remain"] == heldout[0]["original_remain"]
    assert 0.0 <= train[0]["acc_forget"] <= 100.0 and train[0]["stop"] in ("forgotten", "guard", "budget")
    assert train[0]["guard_damage"] is not None  # the default guard read at every check
    assert "| digits_mlp | 1 |" in fidelity_ablation.summary(train, "digits")
    with pytest.raises(SystemExit):
        fidelity_ablation.parse_arguments(["--dataset", "digits", "--name", "x", "--set", "lr"])


def test_ablation_default_guard_is_the_slice_unlearn_holds_out(monkeypatch):
    """``--guard train-observed`` must hand unlearn() the very slice its default guard is."""
    import unsc_fast.unlearn as unlearn_module
    from benchmarks import fidelity_ablation
    from unsc_fast.evaluation.scenario import full_class

    guards = []
    real_monitor = unlearn_module.Monitor

    def spy(predictions, parts, guard, *rest, **kwargs):
        guards.append(guard)
        return real_monitor(predictions, parts, guard, *rest, **kwargs)

    monkeypatch.setattr(unlearn_module, "Monitor", spy)
    scenario = full_class(load_digits_split(), [3])
    torch.manual_seed(0)
    model = create_model("digits_mlp", scenario.num_classes, scenario.split.image_shape)
    unlearn_module.unlearn(model, scenario.forget, scenario.remain, forget_classes=[3], num_classes=10, seed=5,
                           epochs=1)
    x, y = fidelity_ablation.default_guard(scenario, 5)
    assert len(y) > 0 and torch.equal(guards[0][1], y) and torch.equal(guards[0][0], x)


def test_guard_split_holds_data_out_of_every_models_training_per_seed(tmp_path):
    plain = fidelity_suite.Suite(tmp_path, "test", ("unsc",), {}, 1)
    guarded = fidelity_suite.Suite(tmp_path, "test", ("unsc",), {}, 1, guard_split=0.1)
    full, zero, one = plain.data("digits", 0, "fine"), guarded.data("digits", 0, "fine"), guarded.data("digits", 1, "fine")
    assert full.y_val is None and "guard_split" not in plain.signature()
    assert len(zero.y_train) + len(zero.y_val) == len(full.y_train) and torch.equal(zero.x_test, full.x_test)
    assert not torch.equal(zero.y_val, one.y_val) or not torch.equal(zero.x_val, one.x_val)  # drawn per seed
    assert guarded.signature()["guard_split"] == 0.1
    case = fidelity_suite.Case("digits", "digits_mlp", 0, "pair", (3, 8))
    x, y = guarded.scenario(case).guard
    assert len(y) > 0 and not set(y.tolist()) & {3, 8}
    with pytest.raises(SystemExit):
        fidelity_suite.parse_arguments(["--guard-split", "1.5"])


def test_room_runner_measures_the_classifier_layers_selectivity_against_a_hand_computation(tmp_path):
    """``fidelity_room``: per request and threshold, the classifier layer's ratio of the forget
    samples' input energy outside the per-label protected subspace to the remaining samples'."""
    from benchmarks import fidelity_room
    from unsc_fast import NullSpaceProjector

    out = tmp_path / "room.jsonl"
    assert fidelity_room.main(["--dataset", "digits", "--models", "digits_mlp", "--classes", "3", "--train-epochs", "2",
                               "--thresholds", "0.99", "0.8", "--stored", str(tmp_path), "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["classes"] == [3] and set(record["ratios"]) == {"0.99", "0.8"}
    suite = fidelity_suite.Suite(tmp_path, "val", ("unsc",), {}, 2)
    (case,) = fidelity_suite.cases(["digits"], ["digits_mlp"], [0], [3], ["full"])
    model, _ = suite.original(case)
    scenario = suite.scenario(case)
    name = record["classifier"]
    module = dict(model.named_modules())[name]
    projector = NullSpaceProjector(model, statistics="per_label")
    projector.collect([scenario.remain], labels=True)
    projector.build(threshold=0.99, criterion="per_label")
    basis = projector.basis(name).double()

    def inputs(x):
        seen = []
        handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach().double()))
        with torch.no_grad():
            model.eval()(x)
        handle.remove()
        features = seen[0]
        if basis.shape[0] == features.shape[1] + 1:  # the bias as a constant input
            features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
        return features

    def outside(features):
        return 1.0 - float((features @ basis).pow(2).sum() / features.pow(2).sum())

    remain_inputs = inputs(scenario.remain[0])  # the per-label sums add up to the remaining data's own
    expected = outside(inputs(scenario.forget[0])) / outside(remain_inputs)
    # fp32 statistics against fp64 here; 1 - (share inside, ~0.99) amplifies their rounding ~100x
    assert record["ratios"]["0.99"][name] == pytest.approx(expected, rel=1e-4)
    assert "| digits_mlp | 0.99 | 1 |" in fidelity_room.summary([record], [0.99, 0.8])
