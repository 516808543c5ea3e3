"""Variants of the default LM unlearning on the facts benchmark's seed (docs/language_models.md).

Each variant is the benchmark's ``unlearn`` method (``unlearn(model, forget, retain, ...)`` on a
copy of the benchmark's original, from ``--output``'s model cache, trained there when missing)
with the variant's settings, the benchmark's step budget and 2 % forget target unless given;
``"retain_weight": w`` runs ``GradDiff(NPO(), retain_weight=w)``.
Prints one JSON line per variant: steps, stop reason, the forget value accuracy and the share
of each person split's facts kept. Settings are chosen on ``validation``; the other splits are
printed for the record.

    python -m benchmarks.lm_variants --seed 0 --output compare_results \\
        '{"retain_weight": 100}' '{"objective": "npo", "threshold": 0.9999}'
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from unsc_fast.evaluation.facts.data import FactsTask
from unsc_fast.evaluation.facts.methods import METHODS, library_unlearning, method_settings
from unsc_fast.evaluation.facts.runner import FactsConfig, knows_fraction, quick_config, trained_model, unlearning_context
from unsc_fast.objectives.causal_lm import NPO, GradDiff

SPLITS = ("validation", "retain", "unseen")


def run_variant(original, task: FactsTask, variant: dict, seed: int) -> dict:
    """The benchmark's ``unlearn`` method (``facts.methods.library_unlearning``) with ``variant``:
    its own settings (``lr``, ``max_steps``, ``objective``, ``threshold``, ``criterion``) and any
    other ``unlearn`` keyword passed through."""
    options = dict(variant)
    if "retain_weight" in options:
        options["objective"] = GradDiff(NPO(), retain_weight=options.pop("retain_weight"))
    defaults = METHODS["unlearn"].defaults
    settings = method_settings("unlearn", {k: options.pop(k) for k in list(options) if k in defaults})
    start = time.perf_counter()
    model, info = library_unlearning(original, unlearning_context(task), settings, seed, **options)
    row = {"variant": variant, "seconds": round(time.perf_counter() - start, 1), "steps": info["steps"],
           "stop": info["stop_reason"], "objective": info["objective"], "forget": round(info["final_forget_accuracy"], 1)}
    for split in SPLITS:
        row[split] = round(knows_fraction(model, task.facts(task.persons(split))), 1)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="JSON objects of unlearn() settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="compare_results", help="the facts benchmark's model cache folder")
    parser.add_argument("--quick", action="store_true", help="the tests' tiny task and model (seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = quick_config(output=args.output or None, seeds=(args.seed,)) if args.quick else \
        FactsConfig(output=args.output, seeds=(args.seed,))
    task = FactsTask(config.spec, args.seed)
    original, _ = trained_model(config, args.seed, "original")
    for text in args.variants:
        print(json.dumps(run_variant(original, task, json.loads(text), args.seed)), flush=True)


if __name__ == "__main__":
    main()
