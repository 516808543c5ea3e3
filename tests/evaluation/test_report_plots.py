"""The report's plots: one colour and marker per method in every plot and run, no method
hidden under another, and the privacy-vs-utility plot when the per-example attack ran."""
import pytest

from unsc_fast.evaluation.methods import METHODS
from unsc_fast.evaluation.plots import _dodge_sizes, method_style, plot_privacy, plot_tradeoff

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_every_method_has_its_own_fixed_colour_and_marker():
    names = ["original", *METHODS]
    styles = {name: method_style(name) for name in names}
    pairs = {(style["color"], style["marker"]) for style in styles.values()}
    assert len(pairs) == len(names)  # no two methods look alike
    assert len({style["color"] for style in styles.values()}) == len(names)  # not even by colour alone
    assert method_style("retrain") == {"color": "black", "marker": "*", "size": 13}
    # a function of the name only: the same in every plot, whatever else a run contains
    assert all(method_style(name) == styles[name] for name in reversed(names))
    assert method_style("some_future_method") == method_style("some_future_method")


def test_points_on_the_same_spot_are_drawn_concentric_and_grouped():
    points = {"a": (0.0, 99.0, 7), "b": (0.05, 99.02, 7), "c": (5.0, 95.0, 7), "d": (0.0, 99.0, 7)}
    sizes, groups = _dodge_sizes(points, ((-1.0, 11.0), (91.0, 100.0)))
    assert sizes["a"] == 7 and sizes["b"] == 11 and sizes["d"] == 15  # each one bigger than the last
    assert sizes["c"] == 7  # far away: untouched
    assert groups == [["a", "b", "d"]]
    crowd = {str(i): (0.0, 99.0, 7) for i in range(12)}
    assert max(_dodge_sizes(crowd, ((-1.0, 11.0), (91.0, 100.0)))[0].values()) == 7 + 16  # growth is capped


def _results(with_attack: bool):
    def stats(mean, std=0.0):
        return {"mean": mean, "std": std}

    names = ["original", "retrain", "unsc", "salun", "random_labels"]
    values = {"original": (98.0, 99.5, 0.9), "retrain": (0.0, 99.6, 0.5), "unsc": (0.0, 99.0, 0.52),
              "salun": (0.0, 99.0, 0.52), "random_labels": (0.0, 99.0, 0.55)}
    summary = {}
    for name in names:
        forget, remain, auc = values[name]
        metrics = {"acc_forget_test": stats(forget), "acc_remain_test": stats(remain, 0.2)}
        if with_attack:
            metrics["ulira_auc"] = stats(auc, 0.01)
        summary[name] = {"metrics": metrics}
    return {"runs": {name: [] for name in names}, "summary": summary,
            "titles": {name: name for name in names},
            "scenario": {"kind": "full_class", "description": "test"},
            "membership_titles": {"ulira_auc": "U-LiRA AUC"} if with_attack else {}}


@pytest.mark.parametrize("plot", [plot_tradeoff, plot_privacy])
def test_plots_are_written(tmp_path, plot):
    path = tmp_path / "plot.png"
    plot(_results(True), path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_the_zoom_shows_methods_that_keep_more_than_the_retrained_model():
    """Seen on MNIST-1D: UNSC and fine-tune sit above the retrained model's accuracy, and a
    window drawn only below it hid them."""
    from unsc_fast.evaluation.plots import _zoom_window

    results = _results(True)
    metrics = {name: results["summary"][name]["metrics"] for name in results["summary"]}
    metrics["retrain"]["acc_remain_test"]["mean"] = 90.0
    metrics["unsc"]["acc_remain_test"]["mean"] = 95.0           # above the reference, near it
    metrics["salun"]["acc_remain_test"]["mean"] = 83.0          # below, near
    metrics["random_labels"]["acc_remain_test"]["mean"] = 40.0  # far below: not zoomed on
    (low_x, high_x), (low_y, high_y) = _zoom_window(results, "acc_forget_test")
    assert low_x <= 0.0 <= high_x < 98.0  # the original (Acc_f 98) is outside
    assert (low_y, high_y) == (pytest.approx(82.0), pytest.approx(96.0))
    _, (low_y, high_y) = _zoom_window(results, "ulira_auc", x_window=(0.3, 0.8))
    assert (low_y, high_y) == (pytest.approx(82.0), pytest.approx(96.0))
