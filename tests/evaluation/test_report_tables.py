"""The README's side-by-side table of two runs (report.side_by_side_table) and the representation table."""
import pytest

from unsc_fast.evaluation.report import side_by_side_table


def stats(mean, std=0.0):
    return {"mean": mean, "std": std}


def results(methods: dict[str, float]) -> dict:
    """A comparison's results with one accuracy and ToW per method (ToW = accuracy / 100)."""
    return {
        "runs": {name: [] for name in methods},
        "titles": {name: name.title() for name in methods},
        "metric_titles": {"acc_remain_test": "Acc_r test"},
        "distance_titles": {"tow": "ToW"},
        "summary": {name: {"metrics": {"acc_remain_test": stats(acc, 0.5), "tow": stats(acc / 100)},
                           "gap": {"avg_gap": stats(100 - acc)}, "seconds": stats(1.0)}
                    for name, acc in methods.items()},
    }


def test_runs_sit_next_to_each_other_row_by_method():
    table = side_by_side_table({"digits": results({"unsc": 99.0, "retrain": 99.5, "original": 99.6}),
                                "MNIST-1D": results({"retrain": 80.0, "unsc": 79.0, "scrub": 75.0})},
                               ["acc_remain_test", "tow", "avg_gap"])
    lines = table.splitlines()
    assert lines[0] == ("| method | digits Acc_r test | digits ToW | digits avg gap "
                        "| MNIST-1D Acc_r test | MNIST-1D ToW | MNIST-1D avg gap |")
    # original and the reference first, then the first run's order, then methods only later runs have
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| Original", "| **Retrain** (reference)", "| Unsc", "| Scrub"]
    assert lines[4] == "| Unsc | 99.0 ± 0.5 | 0.990 ± 0.000 | 1.00 ± 0.00 | 79.0 ± 0.5 | 0.790 ± 0.000 | 21.00 ± 0.00 |"
    assert lines[3].endswith("| 0 (reference) |")
    assert lines[5].startswith("| Scrub | n/a | n/a | n/a | 75.0 ± 0.5 |")


def test_an_unknown_column_is_named():
    with pytest.raises(KeyError, match="'acc_f'.*acc_remain_test"):
        side_by_side_table({"digits": results({"unsc": 99.0})}, ["acc_f"])


def with_representation(methods: dict[str, tuple[float, float]]) -> dict:
    """Results with probe and relearn figures (probe, relearn) per method; retrain is the reference."""
    base = results({name: 90.0 for name in methods})
    base["representation_titles"] = {"probe_forget": "probe Acc_f test", "relearn_forget": "relearn Acc_f test"}
    reference = methods["retrain"]
    for name, (probe, relearn) in methods.items():
        base["summary"][name]["metrics"].update(probe_forget=stats(probe, 1.0), relearn_forget=stats(relearn))
        gaps = (abs(probe - reference[0]), abs(relearn - reference[1]))
        base["summary"][name]["gap"].update(probe_forget=stats(gaps[0]), relearn_forget=stats(gaps[1]),
                                            representation_gap=stats(sum(gaps) / 2))
    return base


def test_the_representation_table_shows_each_figure_its_gap_and_their_mean():
    from unsc_fast.evaluation.report import representation_table

    run = with_representation({"retrain": (60.0, 10.0), "unsc": (70.0, 30.0), "original": (80.0, 70.0)})
    lines = representation_table(run).splitlines()
    assert lines[0] == ("| method | probe Acc_f test | relearn Acc_f test | Δ probe Acc_f test | Δ relearn Acc_f test "
                        "| representation gap |")
    assert lines[2] == "| Original | 80.0 ± 1.0 | 70.0 ± 0.0 | 20.0 ± 0.0 | 60.0 ± 0.0 | 40.00 ± 0.00 |"
    assert lines[3].endswith("| 0 (reference) |")
    assert lines[4] == "| Unsc | 70.0 ± 1.0 | 30.0 ± 0.0 | 10.0 ± 0.0 | 20.0 ± 0.0 | 15.00 ± 0.00 |"
    assert representation_table(results({"unsc": 99.0})) == ""  # results that predate the metrics
    side = side_by_side_table({"digits": run}, ["probe_forget", "representation_gap"]).splitlines()
    assert side[0] == "| method | digits probe Acc_f test | digits representation gap |"
    assert side[4] == "| Unsc | 70.0 ± 1.0 | 15.00 ± 0.00 |"
