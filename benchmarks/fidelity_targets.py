"""Issue 27's targets, checked on the fidelity suite's cases (``fidelity_suite.py``), and its tables.

Per case and method, against the same case's original and retrained model:

* forget: Acc_f test <= 1 % (sub-class: <= the retrained model's + 1 point, since a model that
  never saw the digit still puts some of it in its coarse class);
* remain: Acc_r test >= the original's - 0.5 points (digits) / - 1.0 (MNIST-1D);
* relearn: the relearning attack within 25 points of what it gives on the retrained model;
* probe: where the original's and the retrained model's probe accuracies differ by >= 5 points,
  the method's at least a quarter of the way from the original's to the retrained one's (the
  fraction of the way is reported; half is the goal);
* suppression: on the probe and on the relearning attack, closer to the retrained model than
  ``logit_suppression``, wherever that baseline is >= 5 points away from it (nearer than that,
  no method can be told from it);
* gap: the mean of |figure - retrained figure| over Acc_r, Acc_f, probe and relearn; averaged
  over the cases, UNSC's must be below NatMU's and the official pipeline's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

REFERENCE, BASELINE, ORIGINAL = "retrain", "logit_suppression", "original"
RIVALS = ("natmu", "unsc_official")
FIGURES = ("acc_remain", "acc_forget", "probe_forget", "relearn_forget")
TITLES = {"acc_remain": "Acc_r test", "acc_forget": "Acc_f test", "probe_forget": "probe Acc_f",
          "relearn_forget": "relearn Acc_f"}
REMAIN_TOLERANCE = {"digits": 0.5, "mnist1d": 1.0}
FORGET_MAX, RELEARN_WITHIN, PROBE_MIN_DIFFERENCE, PROBE_FRACTION, SUPPRESSION_MIN_DISTANCE = 1.0, 25.0, 5.0, 0.25, 5.0
CHECKS = ("forget", "remain", "relearn", "probe", "suppression")


def _value(figures: dict, key: str) -> float:
    value = figures.get(key)
    return float("nan") if value is None else float(value)


def checks(record: dict, method: str) -> dict:
    """{check: (value, passed or None where it does not apply)} and ``gap`` for one method of a case."""
    models = record["models"]
    own, reference, original = models[method], models[REFERENCE], models[ORIGINAL]
    baseline = models.get(BASELINE)
    forget_limit = FORGET_MAX + (_value(reference, "acc_forget") if record["kind"] == "sub" else 0.0)
    forget = _value(own, "acc_forget")
    drop = _value(own, "acc_remain") - _value(original, "acc_remain")
    relearn = abs(_value(own, "relearn_forget") - _value(reference, "relearn_forget"))
    way = _value(original, "probe_forget") - _value(reference, "probe_forget")
    probe = (_value(original, "probe_forget") - _value(own, "probe_forget")) / way \
        if abs(way) >= PROBE_MIN_DIFFERENCE else float("nan")
    results = {
        "forget": (forget, _passed(forget <= forget_limit, forget)),
        "remain": (drop, _passed(drop >= -REMAIN_TOLERANCE.get(record["dataset"], 0.5), drop)),
        "relearn": (relearn, _passed(relearn <= RELEARN_WITHIN, relearn)),
        "probe": (probe, _passed(probe >= PROBE_FRACTION, probe)),
        "suppression": _closer_than_baseline(own, reference, baseline) if method != BASELINE else (float("nan"), None),
    }
    gaps = [abs(_value(own, key) - _value(reference, key)) for key in FIGURES]
    gaps = [gap for gap in gaps if not math.isnan(gap)]
    results["gap"] = (float(np.mean(gaps)) if gaps else float("nan"), None)
    return results


def _passed(condition: bool, value: float):
    return None if math.isnan(value) else bool(condition)


def _closer_than_baseline(own: dict, reference: dict, baseline: dict | None):
    """(how many of probe/relearn apply, all of them closer to the retrained model than the baseline)."""
    if baseline is None:
        return float("nan"), None
    verdicts = []
    for key in ("probe_forget", "relearn_forget"):
        distance = abs(_value(baseline, key) - _value(reference, key))
        if distance >= SUPPRESSION_MIN_DISTANCE:
            verdicts.append(abs(_value(own, key) - _value(reference, key)) < distance)
    return (float(len(verdicts)), all(verdicts)) if verdicts else (0.0, None)


def _methods(records: list[dict]) -> list[str]:
    names: list[str] = []
    for record in records:
        names += [name for name in record["models"] if name not in names]
    return names


def _number(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _failed(result: dict) -> str:
    labels = {"forget": "Acc_f", "remain": "Acc_r", "relearn": "relearn", "probe": "probe", "suppression": "vs suppression"}
    failed = [labels[key] for key in CHECKS if result[key][1] is False]
    return "misses: " + ", ".join(failed) if failed else "meets all"


def format_case(record: dict) -> str:
    """One case as a markdown table (what the suite prints as each case ends)."""
    lines = [f"{record['description']} ({record['case_seconds']:.1f} s)", "",
             "| model | " + " | ".join(TITLES.values()) + " | time s | targets |", "|---" * (len(TITLES) + 3) + "|"]
    for name, figures in record["models"].items():
        verdict = "" if name in (ORIGINAL, REFERENCE) else _failed(checks(record, name))
        cells = [_number(_value(figures, key)) for key in FIGURES] + [_number(figures["seconds"], 2), verdict]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"| {name} | not run: {reason} |" for name, reason in record.get("not_run", {}).items()]
    return "\n".join(lines)


def worst_cases(records: list[dict]) -> dict:
    """Per method: cases, failures and worst value of each check, and the mean gap to retraining."""
    table = {}
    for method in _methods(records):
        if method in (ORIGINAL, REFERENCE):
            continue
        results = [checks(record, method) for record in records if method in record["models"]]
        worst = {"forget": max, "remain": min, "relearn": max, "probe": min, "suppression": max}
        row = {"cases": len(results), "not_run": sum(method in r.get("not_run", {}) for r in records)}
        for key in CHECKS:
            values = [result[key][0] for result in results if not math.isnan(result[key][0])]
            verdicts = [result[key][1] for result in results if result[key][1] is not None]
            row[key] = {"worst": worst[key](values) if values else float("nan"),
                        "failed": verdicts.count(False), "checked": len(verdicts)}
        gaps = [result["gap"][0] for result in results if not math.isnan(result["gap"][0])]
        row["gap"] = float(np.mean(gaps)) if gaps else float("nan")
        table[method] = row
    return table


def worst_table(worst: dict) -> str:
    header = ["method", "cases", "not run", "worst Acc_f (misses)", "worst Acc_r - original (misses)",
              "worst relearn gap (misses)", "worst probe way (misses / checked)", "vs suppression (misses / checked)",
              "avg gap to retrain"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method, row in worst.items():
        def cell(key):
            entry = row[key]
            if key == "suppression":
                return f"{entry['failed']} / {entry['checked']}"
            suffix = f" / {entry['checked']}" if key == "probe" else ""
            return f"{_number(entry['worst'], 2 if key == 'probe' else 1)} ({entry['failed']}{suffix})"
        lines.append(f"| {method} | {row['cases']} | {row['not_run']} | " + " | ".join(cell(k) for k in CHECKS)
                     + f" | {_number(row['gap'], 2)} |")
    return "\n".join(lines)


def gap_verdict(worst: dict) -> str:
    if "unsc" not in worst:
        return "UNSC not run: no gap comparison."
    own = worst["unsc"]["gap"]
    rivals = {name: worst[name]["gap"] for name in RIVALS if name in worst}
    beaten = all(own < gap for gap in rivals.values())
    against = ", ".join(f"{name} {_number(gap, 2)}" for name, gap in rivals.items()) or "no rival run"
    return f"UNSC's average gap to retraining: {_number(own, 2)} (against {against}): {'smaller' if beaten else 'NOT smaller'}."


def averages(records: list[dict]) -> dict:
    """Per model: the mean over cases of Acc_r - original's, Acc_f, probe, relearn, gap and time."""
    table = {}
    for method in _methods(records):
        rows = [record for record in records if method in record["models"]]
        own = [record["models"][method] for record in rows]
        drop = [_value(figures, "acc_remain") - _value(record["models"][ORIGINAL], "acc_remain")
                for figures, record in zip(own, rows)]
        gaps = [checks(record, method)["gap"][0] for record in rows] if method not in (ORIGINAL, REFERENCE) else []
        table[method] = {"cases": len(rows), "remain_drop": float(np.nanmean(drop)),
                         **{key: float(np.nanmean([_value(figures, key) for figures in own])) for key in FIGURES[1:]},
                         "gap": float(np.nanmean(gaps)) if gaps else float("nan"),
                         "seconds": float(np.nanmean([figures["seconds"] for figures in own]))}
    return table


def averages_table(average: dict) -> str:
    header = ["model", "cases", "Acc_r - original", "Acc_f", "probe Acc_f", "relearn Acc_f", "avg gap to retrain", "time s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method, row in average.items():
        cells = [_number(row[key]) for key in ("remain_drop", "acc_forget", "probe_forget", "relearn_forget")]
        lines.append(f"| {method} | {row['cases']} | " + " | ".join(cells) + f" | {_number(row['gap'], 2)} | {_number(row['seconds'], 2)} |")
    return "\n".join(lines)


def reference_remain(records: list[dict]) -> str:
    """How often the retrained model itself falls past the Acc_r tolerance of its case's original:
    the test split's own noise floor for that target (a retrained model differs from the original
    by its training run as much as by the forgotten class)."""
    drops = [(_value(r["models"][REFERENCE], "acc_remain") - _value(r["models"][ORIGINAL], "acc_remain"),
              REMAIN_TOLERANCE.get(r["dataset"], 0.5)) for r in records if REFERENCE in r["models"]]
    drops = [(drop, tolerance) for drop, tolerance in drops if not math.isnan(drop)]
    if not drops:
        return "The retrained model was not run: no noise floor for the Acc_r target."
    missed = sum(drop < -tolerance for drop, tolerance in drops)
    return (f"The retrained model itself is past the Acc_r tolerance on {missed} of {len(drops)} cases "
            f"(worst {_number(min(drop for drop, _ in drops))}).")


def summary_tables(records: list[dict], worst: dict | None = None) -> str:
    """The worst case per method against the targets (``worst_cases``, computed unless given), the
    gap verdict, the retrained model's own Acc_r misses and the means over the cases."""
    worst = worst_cases(records) if worst is None else worst
    return "\n".join([worst_table(worst), "", gap_verdict(worst), reference_remain(records), "",
                      "Mean over the cases (Acc_r as the change from each case's original; gap: mean |figure - retrained|).",
                      "", averages_table(averages(records))])


def cases_table(records: list[dict]) -> str:
    """Every case and method: Acc_r, Acc_f, probe, relearn, time."""
    lines = ["| case | model | " + " | ".join(TITLES.values()) + " | time s |", "|---" * (len(TITLES) + 3) + "|"]
    for record in records:
        for name, figures in record["models"].items():
            cells = [_number(_value(figures, key)) for key in FIGURES] + [_number(figures["seconds"], 2)]
            lines.append(f"| {record['description']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_table(records: list[dict]) -> str:
    """Each request (dataset, model, kind, classes) and model: the mean over seeds of each figure."""
    groups: dict = {}
    for record in records:
        request = (record["dataset"], record["model"], record["kind"], tuple(record["classes"]))
        for name, figures in record["models"].items():
            groups.setdefault(request, {}).setdefault(name, []).append([_value(figures, key) for key in FIGURES])
    lines = ["| request | model | seeds | " + " | ".join(TITLES.values()) + " |", "|---" * (len(TITLES) + 3) + "|"]
    for (dataset, model, kind, classes), by_model in groups.items():
        for name, rows in by_model.items():
            means = np.nanmean(np.array(rows, dtype=float), axis=0) if len(rows) else []
            lines.append(f"| {dataset}/{model} {kind} {'/'.join(map(str, classes))} | {name} | {len(rows)} | "
                         + " | ".join(_number(float(v)) for v in means) + " |")
    return "\n".join(lines)


def write_report(records: list[dict], out: Path, arguments: dict, seconds: float) -> str:
    """results.json, cases.md, table.md and summary.md under ``out``; returns the summary text."""
    worst = worst_cases(records)
    times = [record["case_seconds"] for record in records]
    summary = "\n".join([
        f"# Fidelity suite: {len(records)} cases, split {arguments['split']}, {seconds:.0f} s "
        f"(mean {_number(float(np.mean(times)) if times else float('nan'))} s per case as measured, reused cases "
        "counted with their first run's time)", "",
        "Worst case per method against issue 27's targets (benchmarks/fidelity_targets.py); misses in brackets.", "",
        summary_tables(records, worst)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary + "\n")
    (out / "cases.md").write_text(cases_table(records) + "\n")
    (out / "table.md").write_text(mean_table(records) + "\n")
    (out / "results.json").write_text(json.dumps({"arguments": arguments, "seconds": seconds, "cases": records,
                                                  "worst": finite_json(worst)}, indent=1) + "\n")
    return summary


def finite_json(value):
    """Strict JSON has no NaN: undefined figures become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value
