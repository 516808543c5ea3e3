"""Issue 27's fidelity suite: does UNSC forget every class, on every model, for real?

Every class of the digits and of MNIST-1D forgotten in turn, a fixed list of two-class requests,
sub-class requests (a digit inside its coarse pair) and sequential ones (one class, then
another), on a CNN and an MLP per dataset, over three seeds. Each request runs the methods
through the harness by name (``methods.get_method``), so whatever ``unsc`` is in the library
is what gets measured, and each model is scored on Acc_r / Acc_f test, the linear probe and
the relearning attack on the forgotten classes (``representation.py``). Each case is printed as
it ends; the worst case per method is then checked against the issue's targets
(``fidelity_targets.py``).

Originals are trained once per (dataset, model, seed) with the harness's recipe and cached
under ``--out``/originals; the retrained reference is trained per request (shared by requests
that forget the same classes); finished cases are kept under ``--out``/cases and reused when
the suite is run again with the same settings and library code (``--fresh``: never).
``--split val`` holds out 20 % of every class of the training data (seeded) and reports on it
instead of the test split, for choosing defaults. ``--guard-split F`` holds a further share of
every class out of every model's training and gives it to ``unsc``'s stop rule as the guard
(``unsc.guard=train`` keeps the default, a slice of the remaining training data).

    python benchmarks/fidelity_suite.py --quick                       # one seed, classes 3 and 8
    python benchmarks/fidelity_suite.py --out fidelity_out            # the full suite
    python benchmarks/fidelity_suite.py --split val --set unsc.threshold=0.99 --datasets mnist1d
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import unsc_fast  # noqa: E402

from benchmarks.fidelity_targets import finite_json, format_case, write_report  # noqa: E402
from unsc_fast.evaluation.compare import parse_settings  # noqa: E402
from unsc_fast.evaluation.data import DatasetSplit, holdout_split, validation_part  # noqa: E402
from unsc_fast.evaluation.datasets import load_dataset  # noqa: E402
from unsc_fast.evaluation.methods import UnsupportedScenario, get_method  # noqa: E402
from unsc_fast.evaluation.metrics import accuracy  # noqa: E402
from unsc_fast.evaluation.models import create_model  # noqa: E402
from unsc_fast.evaluation.recipes import train  # noqa: E402
from unsc_fast.evaluation.representation import linear_probe, relearn_attack  # noqa: E402
from unsc_fast.evaluation.scenario import coarse_split, full_class, sequential, sub_class  # noqa: E402

MODELS = {"digits": ("digits_cnn", "digits_mlp"), "mnist1d": ("mnist1d_cnn", "mnist1d_mlp")}
PAIRS = ((3, 8), (1, 7), (4, 9), (0, 5))  # two-class requests, the same for both datasets
SEQUENCES = ((3, 8), (1, 7))              # sequential: the first class, then the second (as the pairs)
KINDS = ("full", "pair", "sub", "seq")
METHODS = ("unsc", "unsc_official", "natmu", "retrain", "logit_suppression")
QUICK_CLASSES = (3, 8)
VALIDATION_FRACTION = 0.2
GUARD_SEED = 1000  # --guard-split draws with GUARD_SEED + seed, apart from the validation split's draw


@dataclass(frozen=True)
class Case:
    """One deletion request on one original: ``classes`` is the class (full), the two classes
    (pair), the fine label (sub) or the classes in request order (seq)."""

    dataset: str
    model: str
    seed: int
    kind: str
    classes: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.model}-s{self.seed}-{self.kind}-{'_'.join(map(str, self.classes))}"

    @property
    def labels(self) -> str:
        """Which labels the original is trained on: the coarse digit pairs for sub-class requests."""
        return "coarse" if self.kind == "sub" else "fine"

    def describe(self) -> str:
        what = {"full": "forget {}", "pair": "forget {} and {}", "sub": "forget digit {} (coarse pairs)",
                "seq": "forget {}, then {}"}[self.kind].format(*self.classes)
        return f"{self.dataset}/{self.model} seed {self.seed}: {what}"


def cases(datasets, models, seeds, classes, kinds) -> list[Case]:
    """Every case of the suite that ``classes`` allows (every class a request names must be in it)."""
    requests = {"full": [(c,) for c in range(10)], "pair": list(PAIRS), "sub": [(c,) for c in range(10)],
                "seq": list(SEQUENCES)}
    chosen = []
    for dataset in datasets:
        for model in (m for m in MODELS[dataset] if models is None or m in models):
            for seed in seeds:
                for kind in kinds:
                    chosen += [Case(dataset, model, seed, kind, request) for request in requests[kind]
                               if set(request) <= set(classes)]
    return chosen


class Suite:
    """Runs cases, keeping data, originals and retrained models for the cases that share them."""

    def __init__(self, out: Path, split: str, methods, settings: dict, train_epochs: int, fresh: bool = False,
                 guard_split: float = 0.0) -> None:
        self.out, self.split, self.methods, self.settings = out, split, tuple(methods), settings
        self.train_epochs, self.fresh, self.guard_split = train_epochs, fresh, guard_split
        self._data: dict = {}
        self._originals: dict = {}
        self._retrained: dict = {}

    def signature(self) -> dict:
        """What a case's figures depend on besides the case, the library's code included: a stored
        case is reused only if equal (a changed ``unsc`` default is measured afresh)."""
        signature = {"split": self.split, "methods": list(self.methods), "settings": self.settings,
                     "train_epochs": self.train_epochs, "code": code_version()}
        if self.guard_split:
            signature["guard_split"] = self.guard_split
        return signature

    def data(self, dataset: str, seed: int, labels: str) -> DatasetSplit:
        """The split a case is trained and scored on (``--split val``: a held-out part of the training
        data, per seed; ``--guard-split``: a validation part, per seed, for the guard), with the
        coarse digit pairs as labels for sub-class requests."""
        key = (dataset, seed if self.split == "val" or self.guard_split else None, labels)
        if key not in self._data:
            if labels == "coarse":
                self._data[key] = coarse_split(self.data(dataset, seed, "fine"))
            else:
                split = load_dataset(dataset, seed=0)
                split = holdout_split(split, VALIDATION_FRACTION, seed) if self.split == "val" else split
                if self.guard_split:  # held out of every model's training: the stop rule's guard
                    split = validation_part(split, self.guard_split, GUARD_SEED + seed)
                self._data[key] = split
        return self._data[key]

    def original(self, case: Case):
        """(model, training seconds): trained once per (dataset, model, seed, labels), cached on disk
        with its training time beside it."""
        key = (case.dataset, case.model, case.seed, case.labels)
        if key not in self._originals:
            split = self.data(case.dataset, case.seed, case.labels)
            torch.manual_seed(case.seed)
            model = create_model(case.model, split.num_classes, split.image_shape)
            guarded = f"-g{self.guard_split:g}" if self.guard_split else ""
            path = (self.out / "originals" /
                    f"{case.dataset}-{case.model}-{case.labels}-s{case.seed}-{self.split}{guarded}-e{self.train_epochs}.pt")
            timing = path.with_suffix(".json")
            if path.exists() and timing.exists():
                model.load_state_dict(torch.load(path, weights_only=True))
                seconds = json.loads(timing.read_text())["seconds"]
                model.eval()
            else:
                start = time.perf_counter()
                train(model, split.x_train, split.y_train, epochs=self.train_epochs, seed=case.seed)
                seconds = time.perf_counter() - start
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)
                timing.write_text(json.dumps({"seconds": seconds}) + "\n")
            self._originals[key] = (model, seconds)
        return self._originals[key]

    def scenario(self, case: Case):
        split = self.data(case.dataset, case.seed, case.labels)
        if case.kind == "sub":  # its split: the coarse labels the original was trained on
            return sub_class(self.data(case.dataset, case.seed, "fine"), case.classes[0])
        if case.kind == "seq":
            return sequential(split, case.classes[:1], case.classes[1:])
        return full_class(split, case.classes)

    def method_settings(self, name: str) -> dict:
        chosen = dict(self.settings.get(name, {}))
        if name == "retrain":
            chosen.setdefault("epochs", self.train_epochs)
        return chosen

    def unlearn(self, name: str, case: Case, original, scenario):
        """A method's result; retrain shared by the cases that forget the same classes."""
        if name != "retrain":
            return get_method(name)(original, scenario, self.method_settings(name), case.seed)
        forgotten = scenario.fine_label if case.kind == "sub" else tuple(sorted(scenario.forget_classes))
        key = (case.dataset, case.model, case.seed, case.labels, forgotten)
        if key not in self._retrained:
            self._retrained[key] = get_method(name)(original, scenario, self.method_settings(name), case.seed)
        return self._retrained[key]

    def run(self, case: Case) -> dict:
        stored = self.out / "cases" / f"{case.key}-{self.split}.json"
        if stored.exists() and not self.fresh:
            record = json.loads(stored.read_text())
            if record.get("signature") == self.signature():
                return record
        start = time.perf_counter()
        original, original_seconds = self.original(case)
        scenario = self.scenario(case)
        figures = {"original": {**measure(original, scenario, case.seed), "seconds": original_seconds}}
        not_run = {}
        for name in self.methods:
            try:
                result = self.unlearn(name, case, original, scenario)
            except UnsupportedScenario as error:
                not_run[name] = str(error)
                continue
            figures[name] = {**measure(result.model, scenario, case.seed), "seconds": result.seconds}
        record = {**asdict(case), "key": case.key, "description": case.describe(),
                  "models": figures, "not_run": not_run, "case_seconds": time.perf_counter() - start,
                  "signature": self.signature()}
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(finite_json(record), indent=1) + "\n")
        return record


def code_version() -> str:
    """A hash of the library's Python sources (``unsc_fast/**/*.py``)."""
    root = Path(unsc_fast.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def measure(model, scenario, seed: int) -> dict:
    """The suite's figures for one model: Acc_r / Acc_f on the evaluation split, probe, relearn."""
    return {"acc_remain": accuracy(model, *scenario.remain_test), "acc_forget": accuracy(model, *scenario.forget_test),
            "probe_forget": linear_probe(model, scenario)["probe_forget"],
            "relearn_forget": relearn_attack(model, scenario, seed=seed)}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--models", nargs="+", default=None, help="default: a CNN and an MLP per dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)),
                        help="classes a request may name (default all ten)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="full: each class; pair: the two-class requests; sub: a digit inside its coarse "
                             "pair; seq: one class, then another (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.SETTING=VALUE")
    parser.add_argument("--quick", action="store_true", help=f"seed 0 and classes {QUICK_CLASSES} only")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: report on 20 %% of each class held out of the training data (seeded per seed)")
    parser.add_argument("--guard-split", type=float, default=0.0, metavar="FRACTION",
                        help="hold this share of every class out of the training data (no model trains on it) "
                             "and give its remaining classes to unsc's stop rule as the guard (default 0: the "
                             "guard is a slice of the remaining training data)")
    parser.add_argument("--train-epochs", type=int, default=30, help="originals and retrained models (default 30)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="fidelity_out", metavar="DIR")
    parser.add_argument("--fresh", action="store_true",
                        help="run every case again, even one stored under --out with the same settings and code")
    args = parser.parse_args(argv)
    if not 0.0 <= args.guard_split < 1.0:
        parser.error(f"--guard-split: a share in [0, 1), got {args.guard_split}")
    if args.quick:
        args.seeds, args.classes = [0], list(QUICK_CLASSES)
    unknown = [m for m in args.models or () if not any(m in models for models in MODELS.values())]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {[m for ms in MODELS.values() for m in ms]}")
    args.methods = [get_method(name).name for name in args.methods]
    if "retrain" not in args.methods:
        args.methods.insert(0, "retrain")  # the reference of every target
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    suite = Suite(out, args.split, args.methods, parse_settings(args.set), args.train_epochs, args.fresh,
                  args.guard_split)
    chosen = cases(args.datasets, args.models, args.seeds, args.classes, args.kinds)
    print(f"{len(chosen)} cases; methods {', '.join(args.methods)}; split {args.split}; output {out}", flush=True)
    records, start = [], time.perf_counter()
    for number, case in enumerate(chosen, 1):
        record = suite.run(case)
        records.append(record)
        print(f"\n[{number}/{len(chosen)}] " + format_case(record), flush=True)
    summary = write_report(records, out, vars(args), time.perf_counter() - start)
    print("\n" + summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
