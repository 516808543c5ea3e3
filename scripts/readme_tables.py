"""Print the README's comparison tables from the runs of scripts/reproduce_readme.sh.

Usage: python scripts/readme_tables.py [OUTPUT_DIR]   (default: reproduce_output)
Reads OUTPUT_DIR/compare (digits) and OUTPUT_DIR/compare_mnist1d, and, where present,
OUTPUT_DIR/privacy_digits and OUTPUT_DIR/privacy_mnist1d; prints markdown to paste.
"""
import json
import sys
from pathlib import Path

from unsc_fast.evaluation.report import side_by_side_table

CLASS_COLUMNS = ["acc_remain_test", "acc_forget_test", "tow", "avg_gap", "seconds"]
REPRESENTATION_COLUMNS = ["probe_forget", "relearn_forget", "representation_gap"]  # docs/metrics.md
PRIVACY_COLUMNS = ["acc_remain_test", "acc_forget_train", "ulira_auc", "ulira_members", "avg_gap"]


def load(folder: Path) -> dict | None:
    path = folder / "comparison.json"
    return json.loads(path.read_text()) if path.exists() else None


def _columns(results: dict) -> set:
    return {*results["metric_titles"], *results.get("distance_titles", {}), *results.get("membership_titles", {}),
            *results.get("representation_titles", {}), "avg_gap", "representation_gap", "seconds"}


def main(root: Path) -> None:
    for title, prefix, columns in (("Full-class forgetting of class 3", "compare", CLASS_COLUMNS),
                                   ("Full-class forgetting of class 3, representation level", "compare",
                                    REPRESENTATION_COLUMNS),
                                   ("Random-sample forgetting, per-example attack", "privacy", PRIVACY_COLUMNS)):
        suffixes = {"digits": "" if prefix == "compare" else "_digits", "MNIST-1D": "_mnist1d"}
        runs = {name: load(root / f"{prefix}{suffix}") for name, suffix in suffixes.items()}
        runs = {name: results for name, results in runs.items()
                if results is not None and set(columns) <= _columns(results)}  # runs that predate a column: left out
        if runs:
            print(f"### {title}\n\n{side_by_side_table(runs, columns)}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "reproduce_output"))
