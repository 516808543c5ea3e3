"""The README's side-by-side table of two runs (report.side_by_side_table)."""
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
