"""Turn a comparison's raw results into what people read: markdown tables, the plots
(drawn by ``plots.py``) and a JSON.

* the metrics table (mean +- std over seeds), the retrained model's row as the reference;
  the average gap has two decimals, since the good methods differ from each other by less than 0.1;
* the gap table: |metric - retrained metric| per seed, then mean +- std;
* per-class test accuracy;
* the representation table: the linear probe and the relearning attack on the forgotten classes
  (``representation.py``, docs/metrics.md) and their gap to the retrained model;
* the side-by-side table of several runs (the README's comparison of two datasets);
* the distance table: KL / JS to the retrained model's outputs, ToW and the attack's figures;
* ``comparison.json``: every raw figure, so runs can be compared later.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from unsc_fast.evaluation.rows import REFERENCE, row_order


def _cell(stats: dict, digits: int = 1) -> str:
    mean, std = stats["mean"], stats["std"]
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _label(results: dict, name: str) -> str:
    title = results["titles"][name]
    return f"**{title}** (reference)" if name == REFERENCE else title


# Columns from the distance to the retrained model (divergence.py) and the per-example attack
# (membership.py) that the main table shows too: key -> (title, digits, scale)
HEADLINE_EXTRAS = {"tow": ("ToW", 3, 1.0), "ulira_auc": ("U-LiRA AUC", 2, 1.0)}


def _extra_titles(results: dict) -> dict:
    """Distance and membership columns present in ``results`` (older results have none)."""
    return {**results.get("distance_titles", {}), **results.get("membership_titles", {})}


def _headline_extras(results: dict) -> dict:
    present = _extra_titles(results)
    return {key: spec for key, spec in HEADLINE_EXTRAS.items() if key in present}


def metrics_table(results: dict) -> str:
    titles = results["metric_titles"]
    extras = _headline_extras(results)
    header = ["method", *titles.values(), *(title for title, _, _ in extras.values()), "avg gap", "time s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in row_order(results):
        summary = results["summary"][name]
        cells = [_cell(summary["metrics"][key]) for key in titles]
        cells += [_cell(summary["metrics"][key], digits) for key, (_, digits, _) in extras.items()]
        gap = "0 (reference)" if name == REFERENCE else _cell(summary["gap"]["avg_gap"], 2)
        lines.append("| " + " | ".join([_label(results, name), *cells, gap, _cell(summary["seconds"], 2)]) + " |")
    return "\n".join(lines)


def distance_table(results: dict) -> str:
    """KL / JS to the retrained model's outputs, ToW and (if run) the U-LiRA figures, mean ± std."""
    titles = _extra_titles(results)
    header = ["method", *titles.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in row_order(results):
        metrics = results["summary"][name]["metrics"]
        digits = {key: (1 if key == "ulira_members" else 3) for key in titles}
        lines.append("| " + " | ".join([_label(results, name), *(_cell(metrics[key], digits[key]) if key in metrics
                                                                 else "n/a" for key in titles)]) + " |")
    return "\n".join(lines)


def gap_table(results: dict) -> str:
    """Gaps of the metrics ``avg_gap`` averages (efficacy and macro accuracy restate others)."""
    gaps_of = next(iter(results["summary"].values()))["gap"] if results["summary"] else {}
    titles = {key: title for key, title in results["metric_titles"].items() if key in gaps_of}
    header = ["method", *(f"Δ {title}" for title in titles.values()), "avg gap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in row_order(results):
        if name == REFERENCE:
            continue
        gaps = results["summary"][name]["gap"]
        lines.append("| " + " | ".join([_label(results, name), *(_cell(gaps[key]) for key in titles),
                                        _cell(gaps["avg_gap"], 2)]) + " |")
    return "\n".join(lines)


def representation_table(results: dict) -> str:
    """Probe and relearning-attack accuracies (mean ± std), their gaps to the retrained model and
    the mean of those two gaps, ``representation_gap`` (empty for results that predate them)."""
    titles = results.get("representation_titles") or {}
    if not titles:
        return ""
    gap_keys = [key for key in ("probe_forget", "relearn_forget") if key in titles]
    header = ["method", *titles.values(), *(f"Δ {titles[key]}" for key in gap_keys), "representation gap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in row_order(results):
        summary = results["summary"][name]
        cells = [_cell(summary["metrics"][key]) for key in titles]
        cells += [_cell(summary["gap"][key]) for key in gap_keys]
        cells.append("0 (reference)" if name == REFERENCE else _cell(summary["gap"]["representation_gap"], 2))
        lines.append("| " + " | ".join([_label(results, name), *cells]) + " |")
    return "\n".join(lines)


def per_class_table(results: dict) -> str:
    classes = results["dataset"]["class_names"]
    header = ["method", *classes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in row_order(results):
        means = [stats["mean"] for stats in results["summary"][name]["per_class_test"]]
        lines.append("| " + " | ".join([_label(results, name), *("n/a" if math.isnan(m) else f"{m:.1f}" for m in means)]) + " |")
    return "\n".join(lines)


def side_by_side_table(named_results: dict[str, dict], keys: list[str]) -> str:
    """One row per method with the chosen columns of several runs next to each other.

    ``named_results`` maps a run's name (e.g. "digits") to its results; ``keys`` are metric
    or distance keys, or "avg_gap" and "seconds". Methods in the order of the first run, then
    any only the others have; "n/a" where a run lacks a method. The README's comparison of
    the two embedded datasets is this table.
    """
    def title(results: dict, key: str) -> str:
        named = {**results["metric_titles"], **_extra_titles(results), **results.get("representation_titles", {}),
                 "avg_gap": "avg gap", "representation_gap": "representation gap", "seconds": "time s"}
        if key not in named:
            raise KeyError(f"side_by_side_table: no column {key!r}; choose from {sorted(named)}")
        return named[key]

    def cell(results: dict, name: str, key: str) -> str:
        if name not in results["summary"]:
            return "n/a"
        summary = results["summary"][name]
        if key in ("avg_gap", "representation_gap"):
            return "0 (reference)" if name == REFERENCE else _cell(summary["gap"][key], 2) if key in summary["gap"] else "n/a"
        if key == "seconds":
            return _cell(summary["seconds"], 2)
        digits = 3 if key in _extra_titles(results) and key != "ulira_members" else 1
        return _cell(summary["metrics"][key], digits) if key in summary["metrics"] else "n/a"

    names: list[str] = []
    for results in named_results.values():
        names += [name for name in row_order(results) if name not in names]
    header = ["method"] + [f"{run} {title(results, key)}" for run, results in named_results.items() for key in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in names:
        owner = next(results for results in named_results.values() if name in results["runs"])
        cells = [cell(results, name, key) for results in named_results.values() for key in keys]
        lines.append("| " + " | ".join([_label(owner, name), *cells]) + " |")
    return "\n".join(lines)


def _representation_section(results: dict) -> list[str]:
    """The representation table with its heading and protocol line (nothing for older results)."""
    if not results.get("representation_titles"):
        return []
    return ["### Representation level: linear probe and relearning attack (docs/metrics.md)", "",
            "Probe: logistic regression on the inputs of the classifier layer, fitted on the whole training split "
            "(original labels), accuracy on the test samples of the forgotten / remaining classes. Relearn: "
            "per-class logit offsets fitted, then 10 Adam steps (lr 1e-3) on 10 forget samples per forgotten label "
            "+ 90 remaining ones, forgotten-class test accuracy, mean of 3 draws. Closer to the retrained model is "
            "better; a model that only hides the class in its logits keeps the original's figures.",
            "", representation_table(results), ""]


def format_report(results: dict) -> str:
    """The whole markdown report: what was run, then the three tables."""
    seeds = results["config"]["seeds"]
    lines = [
        f"## Unlearning comparison: {results['scenario']['description']}",
        "",
        f"Original model: {results['original']['source']}. Mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). "
        "Accuracies and membership-inference rates in %, lower gap is better; the retrained model is the reference. "
        f"torch {results['environment']['torch']}, {results['environment']['threads']} thread(s).",
        "",
        metrics_table(results),
        "",
        "### Gap to the retrained model (|metric - retrained|, per seed)",
        "",
        gap_table(results),
        "",
        *_representation_section(results),
        "### Per-class test accuracy (%)",
        "",
        per_class_table(results),
    ]
    if _extra_titles(results):
        lines += [
            "",
            "### Distance to the retrained model (same seed)",
            "",
            "KL(retrained || model) and Jensen-Shannon divergence (nats, JS <= ln 2 = 0.693) of the softmax outputs, "
            "averaged over each set; ToW (Zhao et al. 2024) = product over forget, remaining and test sets of "
            "(1 - |accuracy - retrained accuracy|), 1 = the retrained model's accuracies."
            + (" U-LiRA: per-example likelihood-ratio attack with shadow models; members = % of forget samples it "
               "calls members, AUC / acc = how well it tells this model from the retrained one on them "
               "(0.5: cannot tell)." if results.get("membership_titles") else ""),
            "",
            distance_table(results),
        ]
    if results["skipped"]:
        lines += ["", "### Not run", ""] + [f"- {reason}" for reason in results["skipped"].values()]
    return "\n".join(lines)


def _mean(results: dict, name: str, key: str) -> float:
    """The mean of ``key`` over ``name``'s seeds (NaN where the method or the figure is missing)."""
    value = results["summary"].get(name, {}).get("metrics", {}).get(key, {}).get("mean")
    return float("nan") if value is None else float(value)


def _nan_to_none(value):
    """Strict JSON has no NaN: undefined figures (e.g. Acc_f test without a forget test set) become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def write_outputs(results: dict, directory) -> dict[str, Path]:
    """Write comparison.md, comparison.json, classwise.png, tradeoff.png, representation.png and,
    when the per-example attack ran, privacy.png; returns their paths."""
    from unsc_fast.evaluation.plots import plot_classwise, plot_privacy, plot_representation, plot_tradeoff

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": directory / "comparison.md",
        "json": directory / "comparison.json",
        "classwise": directory / "classwise.png",
        "tradeoff": directory / "tradeoff.png",
    }
    paths["table"].write_text(format_report(results) + "\n")
    paths["json"].write_text(json.dumps(_nan_to_none(results), indent=1) + "\n")
    plot_classwise(results, paths["classwise"])
    plot_tradeoff(results, paths["tradeoff"])
    if results.get("representation_titles") and not math.isnan(_mean(results, REFERENCE, "relearn_forget")):
        paths["representation"] = directory / "representation.png"
        plot_representation(results, paths["representation"])
    if results.get("membership_titles") and REFERENCE in results["summary"]:
        paths["privacy"] = directory / "privacy.png"
        plot_privacy(results, paths["privacy"])
    return paths
