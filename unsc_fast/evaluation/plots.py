"""The comparison's plots, drawn with matplotlib (the ``eval`` extra) from its raw results.

* ``classwise.png``: per-class test accuracy of original / retrained / UNSC as grouped bars
  (the UNSC paper's class-wise figure);
* ``tradeoff.png``: Acc_r against Acc_f per method, with a zoom around the retrained model;
* ``representation.png``: the relearning attack against the linear probe on the forgotten
  classes (docs/metrics.md), the retrained model the target;
* ``privacy.png`` (with the per-example attack): Acc_r against its AUC.

Every method has one colour and marker in every plot of every run (``method_style``), and
methods on the same spot are drawn as concentric markers with a "same spot" key.
"""
from __future__ import annotations

import math

from unsc_fast.evaluation.rows import REFERENCE, row_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_classwise(results: dict, path) -> None:
    """Grouped bars of per-class test accuracy for original, retrained and UNSC (where run)."""
    import numpy as np

    plt = _pyplot()
    shown = [name for name in ("original", REFERENCE, "unsc") if name in results["runs"]]
    classes = results["dataset"]["class_names"]
    positions = np.arange(len(classes))
    width = 0.8 / len(shown)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.7 * len(classes) + 2), 3.6))
    for offset, name in enumerate(shown):
        stats = results["summary"][name]["per_class_test"]
        means = [s["mean"] for s in stats]
        errors = [s["std"] for s in stats]
        axes.bar(positions + (offset - (len(shown) - 1) / 2) * width, means, width, yerr=errors, capsize=2,
                 label=results["titles"][name], color=method_style(name)["color"], ecolor="dimgrey")
    for forgotten in results["scenario"]["forget_classes"]:
        axes.axvspan(forgotten - 0.45, forgotten + 0.45, color="grey", alpha=0.15, lw=0)
    axes.set_xticks(positions, classes)
    axes.set_ylim(0, 105)
    axes.set_xlabel("class (shaded: forgotten)" if results["scenario"]["forget_classes"] else "class")
    axes.set_ylabel("test accuracy %")
    axes.set_title(results["scenario"]["description"], fontsize=9)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


MARKERS = "osD^v<>PXhp8H*d"


def method_style(name: str) -> dict:
    """A colour and marker fixed per method name, the same in every plot of every run.

    The position in a fixed list (the original, then every registered method in registry
    order) picks one of tab20's 20 colours (dark and light shades alternating, so neighbours
    differ) and one of 14 markers; the retrained model is always a black star. A name not
    in the registry (a method added later) is hashed into the same palette, stably.
    """
    import zlib

    import matplotlib

    from unsc_fast.evaluation.methods import METHODS

    if name == REFERENCE:
        return {"color": "black", "marker": "*", "size": 13}
    names = ["original", *(method for method in METHODS if method != REFERENCE)]
    index = names.index(name) if name in names else zlib.crc32(name.encode()) % 40
    colours = matplotlib.colormaps["tab20"].colors
    colour = colours[(2 * index) % 20 + (index // 10) % 2]
    return {"color": colour, "marker": MARKERS[index % len(MARKERS)], "size": 7}


def _dodge_sizes(points: dict, window) -> tuple[dict, list[list[str]]]:
    """(marker size per method, groups of methods on the same spot).

    Points that would hide each other are drawn as concentric markers (same place, each one
    bigger than the last, the biggest drawn first) instead of being moved, so every method
    stays visible and every position stays true; each group is also labelled in the plot.
    Two points overlap when closer than 2.5 % of the window on both axes.
    """
    (x_low, x_high), (y_low, y_high) = window
    tolerance_x, tolerance_y = 0.025 * (x_high - x_low), 0.025 * (y_high - y_low)
    sizes, groups = {}, []
    for name, (x, y, base) in points.items():
        for group in groups:
            gx, gy, _ = points[group[0]]
            if abs(gx - x) <= tolerance_x and abs(gy - y) <= tolerance_y:
                sizes[name] = base + 4 * min(len(group), 4)  # at most 4 rings: the label names the rest
                group.append(name)
                break
        else:
            sizes[name] = base
            groups.append([name])
    return sizes, [group for group in groups if len(group) > 1]


def _scatter_panels(results: dict, path, x_key: str, x_title: str, y_key: str, y_title: str, title: str,
                    window=None, window_title: str = "", x_digits=None) -> None:
    """One scatter (plus a zoom panel when ``window`` is given) of every method's mean ± std."""
    import textwrap

    plt = _pyplot()
    panels = 2 if window else 1
    legend_width = 3.2  # inches kept free on the right for the legend
    figure, axes_list = plt.subplots(1, panels, figsize=(5.4 * panels + legend_width, 5.6), squeeze=False)
    axes_list = list(axes_list[0])
    names = [name for name in row_order(results) if x_key in results["summary"][name]["metrics"]]
    for axes_index, axes in enumerate(axes_list):
        points = {}
        for name in names:
            metrics = results["summary"][name]["metrics"]
            x, y = metrics[x_key]["mean"], metrics[y_key]["mean"]
            if x is None or y is None or math.isnan(x) or math.isnan(y):
                continue
            points[name] = (x, y, method_style(name)["size"])
        limits = window if (window and axes_index == 1) else None
        if limits is None:
            xs = [p[0] for p in points.values()] or [0.0]
            ys = [p[1] for p in points.values()] or [0.0]
            limits = ((min(xs), max(xs) + 1e-9), (min(ys), max(ys) + 1e-9))
        if window and axes_index == 1:  # the zoom neither draws nor names what lies outside it
            (x_low, x_high), (y_low, y_high) = window
            points = {name: p for name, p in points.items() if x_low <= p[0] <= x_high and y_low <= p[1] <= y_high}
        sizes, groups = _dodge_sizes(points, limits)
        # biggest first, so the smaller markers on top of them stay visible
        for name in sorted(points, key=lambda n: -sizes[n]):
            metrics = results["summary"][name]["metrics"]
            style = method_style(name)
            axes.errorbar(metrics[x_key]["mean"], metrics[y_key]["mean"], xerr=metrics[x_key]["std"],
                          yerr=metrics[y_key]["std"], fmt=style["marker"], markersize=sizes[name], capsize=2,
                          color=style["color"], markeredgecolor="white", markeredgewidth=0.8, ecolor=style["color"],
                          elinewidth=0.8, label=results["titles"][name] if axes_index == 0 else None)
        # each group of methods on one spot gets a letter next to it and a line in a key box
        key = []
        for number, group in enumerate(groups):
            x, y, _ = points[group[0]]
            letter = "ABCDEFGHIJ"[number % 10]
            axes.annotate(letter, (x, y), xytext=(9, 9), textcoords="offset points", fontsize=8, fontweight="bold",
                          bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "ec": "grey", "lw": 0.6})
            names_text = ", ".join(results["titles"][name] for name in group)
            key.append(textwrap.fill(f"{letter}: {names_text}", 58, subsequent_indent="    "))
        if key:
            # below the axes, where it can hide no point
            axes.text(0.0, -0.16, "same spot\n" + "\n".join(key), transform=axes.transAxes, fontsize=6.5, va="top",
                      ha="left", bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "grey", "lw": 0.5})
        axes.set_xlabel(x_title)
        axes.set_ylabel(y_title)
        axes.grid(alpha=0.3)
    axes_list[0].set_title(textwrap.fill(title, 70), fontsize=9)
    if window:
        axes_list[1].set_xlim(*window[0])
        axes_list[1].set_ylim(*window[1])
        axes_list[1].set_title(window_title, fontsize=9)
    from matplotlib.lines import Line2D

    shown = [name for name in names if results["titles"][name] in axes_list[0].get_legend_handles_labels()[1]]
    handles = [Line2D([], [], linestyle="none", marker=method_style(name)["marker"], color=method_style(name)["color"],
                      markersize=method_style(name)["size"]) for name in shown]  # legend in table order, one size
    figure.legend(handles, [results["titles"][name] for name in shown], fontsize=7, loc="center left",
                  bbox_to_anchor=(1.0 - (legend_width - 0.1) / figure.get_figwidth(), 0.5))
    figure.tight_layout(rect=(0, 0, 1.0 - legend_width / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _zoom_window(results: dict, x_key: str, x_window: tuple[float, float] | None = None):
    """Axis limits around the retrained model's point (None when it has no finite point).

    x: ``x_window``, or 6 points either side of the reference. y: every method whose point
    lies in that x range and within 8 points of the reference's accuracy, above or below
    it (on MNIST-1D several methods keep more than the retrained model), plus a margin.
    """
    reference = results["summary"].get(REFERENCE)
    if reference is None:
        return None
    x, y = reference["metrics"][x_key]["mean"], reference["metrics"]["acc_remain_test"]["mean"]
    if x is None or y is None or math.isnan(x) or math.isnan(y):
        return None
    low_x, high_x = x_window or (max(-1.0, x - 6.0), min(101.0, x + 6.0))
    near = [y]
    for summary in results["summary"].values():
        point_x, point_y = summary["metrics"][x_key]["mean"], summary["metrics"]["acc_remain_test"]["mean"]
        if None in (point_x, point_y) or math.isnan(point_x) or math.isnan(point_y):
            continue
        if low_x <= point_x <= high_x and abs(point_y - y) <= 8.0:
            near.append(point_y)
    return (low_x, high_x), (max(0.0, min(near) - 1.0), min(101.0, max(near) + 1.0))


def plot_tradeoff(results: dict, path) -> None:
    """Acc_r (test) against Acc_f for every method; the retrained model marks the target.

    Acc_f is on the forget classes' test samples for full-class (and sequential, and the
    fine label's for sub-class) forgetting and on the forget set itself for random-sample
    and memorised forgetting (there is no forget test set then).
    Every method keeps its colour and marker across plots and runs (``method_style``); a
    second panel zooms in on the retrained model's neighbourhood, where the good methods
    crowd together, and methods on the same spot are drawn as concentric rings.
    """
    with_test = ("full_class", "sub_class", "sequential")  # the sample-wise requests have no forget test set
    forget_key = "acc_forget_test" if results["scenario"]["kind"] in with_test else "acc_forget_train"
    x_title = ("Acc_f test" if forget_key == "acc_forget_test" else "Acc_f train (forget set)") + " %  (lower forgets more)"
    _scatter_panels(results, path, forget_key, x_title, "acc_remain_test", "Acc_r test %  (higher keeps more)",
                    results["scenario"]["description"], _zoom_window(results, forget_key),
                    "zoom: around the retrained model (star)")


def plot_representation(results: dict, path) -> None:
    """Forgetting in the features: relearn Acc_f (y) against probe Acc_f (x), both on the forgotten
    classes' test samples; the retrained model (star) is the target, the original and the
    logit-suppression baseline (output-level forgetting only) mark what not forgetting looks like."""
    window = None
    reference = results["summary"].get(REFERENCE)
    if reference is not None:
        x, y = (reference["metrics"][key]["mean"] for key in ("probe_forget", "relearn_forget"))
        if None not in (x, y) and not (math.isnan(x) or math.isnan(y)):
            window = ((max(-1.0, x - 10.0), min(101.0, x + 10.0)), (max(-1.0, y - 20.0), min(101.0, y + 20.0)))
    _scatter_panels(results, path, "probe_forget", "linear probe Acc_f test %  (closer to retrain is better)",
                    "relearn_forget", "relearn attack Acc_f test %",
                    "representation level: " + results["scenario"]["description"], window,
                    "zoom: around the retrained model (star)")


def plot_privacy(results: dict, path) -> None:
    """Privacy against utility: the per-example attack's AUC (unlearned vs retrained model
    on the forget set; 0.5 = indistinguishable) against Acc_r test. The target is the
    retrained model's point (0.5, its Acc_r); a zoom panel shows its neighbourhood."""
    window = _zoom_window(results, "ulira_auc", x_window=(0.3, 0.8))
    _scatter_panels(results, path, "ulira_auc", "U-LiRA AUC: model vs retrained, forget set  (0.5 = cannot tell)",
                    "acc_remain_test", "Acc_r test %  (higher keeps more)",
                    "privacy vs utility: " + results["scenario"]["description"], window,
                    "zoom: around AUC 0.5 and the retrained model's accuracy")
