"""How much room the null space leaves to forget each class of the fidelity suite, per layer.

A projected update moves a layer's output only through the part of its input outside the
protected subspace (``unsc_fast.room``). A class can be forgotten without touching the others
as far as its inputs reach directions the remaining classes do not: ``selectivity`` is the
ratio of the forget samples' energy outside the subspace to the remaining samples'. This runner
measures it, before any unlearning, for every single-class request of the suite's validation
split, under the per-label protection ``unlearn()`` builds, at the thresholds of its ladder.

    python -m benchmarks.fidelity_room --dataset mnist1d --seeds 0 1
    python -m benchmarks.fidelity_room --dataset digits --seeds 0 1 --thresholds 0.99 0.8

Prints, per model and threshold, the classifier layer's ratio (mean and range over the
classes); ``--out`` keeps every layer's figures as JSON lines. Originals come from
``--stored``, as ``fidelity_ablation`` takes them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fidelity_ablation import add_request_arguments  # noqa: E402
from benchmarks.fidelity_suite import Suite, cases  # noqa: E402
from unsc_fast import NullSpaceProjector  # noqa: E402
from unsc_fast.room import selectivity  # noqa: E402
from unsc_fast.unlearning.data import find_classifier  # noqa: E402
from unsc_fast.unlearning.protection import batches_of  # noqa: E402

THRESHOLDS = (0.99, 0.9, 0.8)  # the ladder's start, middle and floor (unsc_fast.unlearning.schedule)


def room(model, scenario, thresholds) -> dict:
    """``{threshold: {layer: selectivity}}`` for one request and the classifier layer's name."""
    projector = NullSpaceProjector(model, statistics="per_label")
    projector.collect(batches_of(scenario.remain, 256), labels=True)
    forget_x = scenario.forget[0]
    found = find_classifier(model, projector.layers, ((forget_x[:2],), {}, None))
    ratios = {}
    for threshold in thresholds:
        projector.build(threshold=threshold, criterion="per_label")  # the remaining classes only
        ratios[threshold] = selectivity(model, projector, forget_x)
    return {"ratios": ratios, "classifier": found[0] if found is not None else None}


def summary(records: list[dict], thresholds) -> str:
    """Per model and threshold: the classifier layer's ratio over the classes (the layer whose
    inputs the feature-erasure term and the logits see; an early layer whose basis is nearly full
    divides two near-zero shares, so its ratio says little)."""
    lines = ["| model | threshold | classes | classifier layer: mean (min - max) |", "| --- | --- | --- | --- |"]
    for model in sorted({r["model"] for r in records}):
        rows = [r for r in records if r["model"] == model and r["classifier"]]
        for threshold in thresholds:
            head = [r["ratios"][str(threshold)][r["classifier"]] for r in rows]
            text = f"{sum(head) / len(head):.2f} ({min(head):.2f} - {max(head):.2f})" if head else "n/a"
            lines.append(f"| {model} | {threshold} | {len(rows)} | {text} |")
    return "\n".join(lines)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--out", default=None, metavar="FILE", help="JSON lines, one per request")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    suite = Suite(Path(args.stored), "val", ("unsc",), {}, args.train_epochs)
    records = []
    sink = Path(args.out).open("a") if args.out else None
    try:
        for case in cases([args.dataset], args.models, args.seeds, args.classes, ["full"]):
            original, _ = suite.original(case)
            measured = room(original, suite.scenario(case), args.thresholds)
            record = {"model": case.model, "seed": case.seed, "classes": list(case.classes),
                      "classifier": measured["classifier"],
                      "ratios": {str(t): ratios for t, ratios in measured["ratios"].items()}}
            records.append(record)
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            head = {t: round(r.get(measured["classifier"], float("nan")), 2) for t, r in measured["ratios"].items()}
            print(f"{case.describe()}: classifier layer {head}", flush=True)
    finally:
        if sink is not None:
            sink.close()
    print("\n" + summary(records, args.thresholds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
