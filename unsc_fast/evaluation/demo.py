"""The main job: forget one digit class with UNSC and compare with retraining and with the
naive baseline, fine-tuning on the forget data alone with random labels (``FORGET_ONLY_RANDOM``;
not ``compare``'s ``random_labels`` method, which also trains on the remaining data).

Everything runs on scikit-learn's bundled digits (no download) in about a minute on 2 cores.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass

import torch

from unsc_fast.evaluation.data import class_mask, load_digits_split
from unsc_fast.evaluation.metrics import membership_inference
from unsc_fast.evaluation.models import DigitsCNN
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.evaluation.recipes import train
from unsc_fast.unlearn import unlearn

# The demo's baseline: random labels on the forget data only, no projection. Named apart from
# compare's "random labels" method, which also fine-tunes on the remaining data.
FORGET_ONLY_RANDOM = "random labels, forget data only"


@dataclass
class DemoRow:
    method: str
    remain_test: float
    forget_test: float
    remain_train: float
    forget_train: float
    membership: float
    seconds: float


COLUMNS = (
    ("method", "method", "{}"),
    ("remain_test", "Acc_r test %", "{:.2f}"),
    ("forget_test", "Acc_f test %", "{:.2f}"),
    ("remain_train", "Acc_r train %", "{:.2f}"),
    ("forget_train", "Acc_f train %", "{:.2f}"),
    ("membership", "MIA on forget %", "{:.1f}"),
    ("seconds", "time s", "{:.2f}"),
)


def format_table(rows: list[DemoRow]) -> str:
    """A markdown table, one row per method."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(getattr(row, key)) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    forget_class: int = 3,
    seed: int = 0,
    threshold: float | None = None,
    train_epochs: int = 30,
    unlearn_epochs: int = 5,
    lr: float = 0.01,
    progress=None,
) -> list[DemoRow]:
    """Train, retrain without ``forget_class``, unlearn with UNSC (``unlearn()``'s default preset,
    with ``threshold`` as its start where given) and with random labels on the forget data
    alone (no projection, ``unlearn_epochs`` at ``lr``); one row each."""
    if not 0 <= forget_class <= 9:
        raise ValueError(f"forget_class must be a digit 0-9, got {forget_class}")
    torch.manual_seed(seed)
    split = load_digits_split(seed=seed)
    forget_train = class_mask(split.y_train, [forget_class])
    forget_test = class_mask(split.y_test, [forget_class])
    remain = (split.x_train[~forget_train], split.y_train[~forget_train])
    forget = (split.x_train[forget_train], split.y_train[forget_train])

    def row(method: str, model, seconds: float) -> DemoRow:
        return DemoRow(
            method,
            accuracy(model, split.x_test[~forget_test], split.y_test[~forget_test]),
            accuracy(model, split.x_test[forget_test], split.y_test[forget_test]),
            accuracy(model, *remain),
            accuracy(model, *forget),
            membership_inference(model, remain, (split.x_test, split.y_test), forget, seed=seed),
            seconds,
        )

    start = time.perf_counter()
    original = train(DigitsCNN(), split.x_train, split.y_train, epochs=train_epochs, seed=seed,
                     progress=progress, label="original")
    rows = [row("original", original, time.perf_counter() - start)]

    start = time.perf_counter()
    retrained = train(DigitsCNN(), *remain, epochs=train_epochs, seed=seed, progress=progress, label="retrain")
    rows.append(row("retrain (gold standard)", retrained, time.perf_counter() - start))

    unsc = dict(threshold=threshold)
    # the naive baseline runs its epochs as they are: no stop rule, no guard, no distillation
    naive = dict(calibrate=False, project=False, stop=None, features=0.0, distill=0.0, epochs=unlearn_epochs, lr=lr)
    for method, options in (("UNSC", unsc), (FORGET_ONLY_RANDOM, naive)):
        model = copy.deepcopy(original)
        result = unlearn(model, forget, remain, forget_classes=[forget_class], seed=seed, progress=progress, **options)
        rows.append(row(method, model, result.seconds))
    return rows


def main(args) -> int:
    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    rows = run_demo(
        forget_class=args.forget_class,
        seed=args.seed,
        threshold=args.threshold,
        train_epochs=args.train_epochs,
        unlearn_epochs=args.epochs,
        lr=args.lr,
        progress=None if args.quiet else progress,
    )
    shown = "unlearn()'s default preset" if args.threshold is None else f"threshold {args.threshold}"
    print(f"\nForgetting digit {args.forget_class} (sklearn digits, seed {args.seed}, UNSC: {shown})\n")
    print(format_table(rows))
    return 0
