"""The facts benchmark's table (mean +- std over seeds) and its files (markdown and JSON)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from unsc_fast.evaluation.facts.methods import METHODS

COLUMNS = {  # metric -> (title, format)
    "forget_accuracy": ("forget %", "{:.1f}"),
    "retain_accuracy": ("retain %", "{:.1f}"),
    "unseen_accuracy": ("unseen %", "{:.1f}"),
    "validation_accuracy": ("validation %", "{:.1f}"),
    "copy_accuracy": ("copy %", "{:.1f}"),
    "successor_accuracy": ("successor %", "{:.1f}"),
    "forget_log_prob": ("forget log-prob", "{:.2f}"),
    "forget_quality": ("forget quality", "{:.2g}"),
    "model_utility": ("model utility", "{:.3f}"),
}
TITLES = {"original": "original", "retrain": "retrain (reference)"}


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def format_table(results: dict) -> str:
    """One row per method: mean ± std over the seeds of every column, the picked learning
    rates, the steps taken and the seconds of the reported run (training for the original
    and the retrained model; the learning-rate search is in the total)."""
    by_method: dict[str, list[dict]] = {}
    for row in results["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    header = ["method", "lr (picked)", "steps"] + [title for title, _ in COLUMNS.values()] + ["s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in by_method.items():
        title = TITLES.get(name) or (METHODS[name].title if name in METHODS else name)
        lrs = ", ".join(f"{r['lr']:g}" for r in rows) if rows[0]["lr"] is not None else "-"
        steps = ", ".join(str(r["info"]["steps"]) for r in rows) if "steps" in rows[0]["info"] else "-"
        cells = [_spread([r["metrics"].get(key) for r in rows], fmt) for key, (_, fmt) in COLUMNS.items()]
        seconds = _spread([r["seconds"] for r in rows], "{:.0f}")
        lines.append("| " + " | ".join([title, lrs, steps, *cells, seconds]) + " |")
    seeds = sorted({r["seed"] for r in results["rows"]})
    lines.append("")
    per_seed = results["config"].get("pick_lr_each_seed")
    lines.append(f"{results['task']}. Seeds {', '.join(map(str, seeds))}; every run stops at forget value accuracy "
                 f"<= 2 % or its step budget; learning rates picked on "
                 f"{'each seed' if per_seed else f'seed {seeds[0]}'}'s validation persons. Whole run (training, "
                 f"learning-rate search, evaluation): {results['seconds']:.0f} s with "
                 f"{results['environment']['workers']} worker process(es).")
    return "\n".join(lines)


def write_outputs(results: dict, folder: str) -> dict[str, Path]:
    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    paths = {"table": folder_path / "facts.md", "json": folder_path / "facts.json"}
    paths["table"].write_text(format_table(results) + "\n")
    paths["json"].write_text(json.dumps(results, indent=1, default=float))
    return paths
