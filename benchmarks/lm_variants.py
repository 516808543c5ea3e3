"""Variants of the default LM unlearning on the facts benchmark's seed (docs/language_models.md).

Each variant is ``unlearn(model, forget, retain, **settings)`` on a copy of the benchmark's
original (from ``--output``'s model cache, trained there when missing), with the benchmark's
step budget and 2 % forget target; ``"retain_weight": w`` runs ``GradDiff(NPO(), retain_weight=w)``.
Prints one JSON line per variant: steps, stop reason, the forget value accuracy and the share
of each person split's facts kept. Settings are chosen on ``validation``; the other splits are
printed for the record.

    python -m benchmarks.lm_variants --seed 0 --output compare_results \\
        '{"retain_weight": 100}' '{"objective": "npo", "threshold": 0.9999}'
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from unsc_fast.evaluation.facts.data import FactsTask
from unsc_fast.evaluation.facts.metrics import forget_accuracy
from unsc_fast.evaluation.facts.runner import FactsConfig, knows_fraction, quick_config, trained_model, unlearning_context
from unsc_fast.objectives.causal_lm import NPO, GradDiff
from unsc_fast.unlearn import unlearn
from unsc_fast.unlearning.language_request import LANGUAGE_DEFAULTS

SPLITS = ("validation", "retain", "unseen")


def run_variant(original, task: FactsTask, settings: dict, seed: int) -> dict:
    kwargs = dict(settings)
    steps = kwargs.pop("max_steps", 200)
    if "retain_weight" in kwargs:
        kwargs["objective"] = GradDiff(NPO(), retain_weight=kwargs.pop("retain_weight"))
    context = unlearning_context(task)
    model = copy.deepcopy(original)
    rule = replace(LANGUAGE_DEFAULTS["stop"], max_steps=steps, forget_target=2.0)
    start = time.perf_counter()
    result = unlearn(model, context.forget.batch(), context.retain.batch(), stop=rule, seed=seed, **kwargs)
    model.eval()
    row = {"variant": settings, "seconds": round(time.perf_counter() - start, 1), "steps": result.steps,
           "stop": result.stop_reason, "objective": result.objective,
           "forget": round(forget_accuracy(model, task, context.forget_check), 1)}
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
