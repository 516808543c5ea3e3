"""Why the relearning attack fits logit offsets first: the issue-27 check, reproducible.

For one model and one forgotten class (defaults: digits CNN forget 8 and MNIST-1D CNN forget 4,
seed 0), prints for the original, the retrained model, ``unsc`` (the library's default),
``logit_suppression`` and the original with the forgotten class's bias lowered by 30:
Acc_r / Acc_f test, the linear probe, the plain 10-step relearning attack (fooled by a large
bias), the fitted offsets alone (no step) and the harness's attack (``representation.relearn_attack``:
offsets fitted, then the same 10 steps); every attack is the mean of 3 relearn sets. Documented
in docs/metrics.md.

    python benchmarks/relearn_protocol.py
    python benchmarks/relearn_protocol.py --cases digits:digits_cnn:8 mnist1d:mnist1d_cnn:4 --seed 0
"""
from __future__ import annotations

import argparse
import copy

import torch

from unsc_fast.evaluation.datasets import load_dataset
from unsc_fast.evaluation.methods import get_method
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.evaluation.models import create_model
from unsc_fast.evaluation.recipes import train
from unsc_fast.evaluation.representation import classifier_layer, linear_probe, relearn_attack
from unsc_fast.evaluation.scenario import full_class


def rows(dataset: str, model_name: str, forgotten: int, seed: int, epochs: int):
    split = load_dataset(dataset, seed=0)
    scenario = full_class(split, [forgotten])
    torch.manual_seed(seed)
    original = train(create_model(model_name, split.num_classes, split.image_shape), split.x_train, split.y_train,
                     epochs=epochs, seed=seed)
    models = {"original": original}
    for name in ("retrain", "unsc", "logit_suppression"):
        settings = {"epochs": epochs} if name == "retrain" else {}
        models[name] = get_method(name)(original, scenario, settings, seed).model
    lowered = copy.deepcopy(original)
    _, layer = classifier_layer(lowered, split.x_train)
    with torch.no_grad():
        layer.bias[forgotten] -= 30.0
    models["bias lowered by 30"] = lowered
    for name, model in models.items():
        probe = linear_probe(model, scenario)
        yield (name, accuracy(model, *scenario.remain_test), accuracy(model, *scenario.forget_test),
               probe["probe_forget"], relearn_attack(model, scenario, seed=seed, fit_offsets=False),
               relearn_attack(model, scenario, seed=seed, steps=0), relearn_attack(model, scenario, seed=seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["digits:digits_cnn:8", "mnist1d:mnist1d_cnn:4"],
                        metavar="DATASET:MODEL:CLASS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for case in args.cases:
        dataset, model_name, forgotten = case.split(":")
        print(f"\n{dataset}, {model_name}, forget {forgotten}, seed {args.seed} (test split, %)\n")
        print("| model | Acc_r test | Acc_f test | probe Acc_f | relearn: plain 10 steps | offsets fitted, no step "
              "| relearn: offsets fitted + 10 steps (the harness's) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in rows(dataset, model_name, int(forgotten), args.seed, args.train_epochs):
            print(f"| {row[0]} | " + " | ".join(f"{value:.1f}" for value in row[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
