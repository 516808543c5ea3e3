"""Mean and standard deviation over seeds of a comparison's figures (moved out of ``compare.py``,
which stays under 350 lines)."""
from __future__ import annotations

import numpy as np


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every scalar metric, gap and the time."""
    summary = {}
    for section in ("metrics", "gap"):
        keys = [k for k in runs[0][section] if k != "per_class_test"]
        summary[section] = {k: _mean_std([run[section][k] for run in runs]) for k in keys}
    summary["seconds"] = _mean_std([run["seconds"] for run in runs])
    per_class = np.array([run["metrics"]["per_class_test"] for run in runs], dtype=float)
    summary["per_class_test"] = [_mean_std(column) for column in per_class.T]
    return summary


def _mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return {"mean": float("nan"), "std": float("nan")}
    std = float(np.nanstd(values, ddof=1)) if np.sum(~np.isnan(values)) > 1 else 0.0
    return {"mean": float(np.nanmean(values)), "std": std}
