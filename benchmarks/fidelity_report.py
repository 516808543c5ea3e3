"""Tables of a fidelity suite's stored cases, per dataset, for a chosen set of request kinds.

The suite (``fidelity_suite.py``) writes one summary for the cases of its own run; this reads
every case stored under ``--out`` (``cases/*.json``), keeps those of one code version and split,
and prints the worst-case and mean tables per dataset (how docs/fidelity.md's tables were made)::

    python -m benchmarks.fidelity_report fidelity_out --kinds full pair
    python -m benchmarks.fidelity_report fidelity_out --kinds sub seq --code a97cd8426e2eebf4
    python -m benchmarks.fidelity_report fidelity_out --kinds full pair --costs

``--costs`` adds, per model, each method's time as a multiple of the retraining of the same
request (timed one after the other in one process, so the ratio holds where the seconds drift
with the machine's load): the mean over the requests (benchmarks/RESULTS.md, issue 25 item 3).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from benchmarks.fidelity_targets import summary_tables


def stored_cases(out: Path, kinds: list[str], split: str, code: str | None) -> dict[str, list[dict]]:
    """{dataset: records} of the cases under ``out`` (the newest code version when ``code`` is None)."""
    records = [json.loads(path.read_text()) for path in sorted((out / "cases").glob("*.json"))]
    records = [r for r in records if r["kind"] in kinds and r.get("signature", {}).get("split") == split]
    if code is None and records:
        code = Counter(r["signature"]["code"] for r in records).most_common(1)[0][0]
    by_dataset: dict[str, list[dict]] = {}
    for record in records:
        if record["signature"]["code"] == code:
            by_dataset.setdefault(record["dataset"], []).append(record)
    return by_dataset


def cost_table(by_dataset: dict[str, list[dict]]) -> str:
    """Mean over the requests of each method's seconds / the retraining's, per model."""
    methods = [m for m in next(iter(by_dataset.values()))[0]["models"] if m not in ("original", "retrain")]
    lines = ["| model | requests | " + " | ".join(f"{m} / retraining" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for records in by_dataset.values():
        for model in dict.fromkeys(r["model"] for r in records):
            own = [r["models"] for r in records if r["model"] == model and "retrain" in r["models"]]
            cells = []
            for method in methods:
                ratios = [m[method]["seconds"] / m["retrain"]["seconds"] for m in own if method in m]
                cells.append(f"{sum(ratios) / len(ratios):.2f}" if ratios else "n/a")
            lines.append(f"| {model} | {len(own)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(by_dataset: dict[str, list[dict]]) -> str:
    parts = []
    for dataset, records in by_dataset.items():
        kinds = ", ".join(sorted({r["kind"] for r in records}))
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in records}))
        parts += [f"#### {dataset}: {len(records)} requests ({kinds}), seeds {seeds}", "", summary_tables(records), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the suite's --out folder")
    parser.add_argument("--kinds", nargs="+", default=["full", "pair", "sub", "seq"])
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--code", default=None, help="code version of the cases (default: the most common)")
    parser.add_argument("--costs", action="store_true", help="add each method's time / the retraining's, per model")
    args = parser.parse_args(argv)
    by_dataset = stored_cases(args.out, args.kinds, args.split, args.code)
    print(report(by_dataset))
    if args.costs and by_dataset:
        print("Time as a multiple of the same request's retraining (mean over the requests):\n")
        print(cost_table(by_dataset))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
