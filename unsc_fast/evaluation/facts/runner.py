"""The facts benchmark run: per seed an original and a retrained model (cached in the output
folder), every method with its learning rate picked on the validation persons, every metric.

Jobs run in worker processes (``workers``, one torch thread each: the tiny model's matrices
gain little from a second thread, a second process doubles the throughput on 2 cores):
first the 2 x seeds trained models, then one job per (seed, method). ``workers=1`` runs
everything in this process.
"""
from __future__ import annotations

import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from unsc_fast.evaluation.facts.data import FactsSpec, FactsTask, Sequences
from unsc_fast.evaluation.facts.methods import METHODS, UnlearningContext, method_settings
from unsc_fast.evaluation.facts.metrics import answer_log_probs, evaluate, knows_facts, truth_ratios
from unsc_fast.evaluation.facts.model import ModelSpec, TrainSpec, cached_model, gpt2, spec_key, train_language_model
from unsc_fast.training import Progress

ROLES = ("original", "retrain")


@dataclass
class FactsConfig:
    """Everything a facts run depends on (saved with its results)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    spec: FactsSpec = field(default_factory=FactsSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    settings: dict = field(default_factory=dict)   # method -> {setting: value}; "lr" fixes the learning rate
    output: str | None = "compare_results"
    workers: int = 2
    pick_lr_each_seed: bool = False  # False: the first seed's validation persons pick each method's lr

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown facts method(s) {unknown}; choose from {', '.join(METHODS)}")
        for name in self.methods:
            method_settings(name, self.settings.get(name))  # a bad setting fails before any training


def quick_config(**overrides) -> FactsConfig:
    """A configuration that runs in seconds (tests, smoke runs): 24 persons, a 1-layer model."""
    base = FactsConfig(
        seeds=(0,), spec=FactsSpec(persons=24, relations=2, values_per_relation=6, forget=4, validation=4, unseen=4,
                                   symbols=8, copy_train=64, copy_test=16, perturbed=3),
        model=ModelSpec(n_layer=1, n_embd=32, n_head=2),
        train=TrainSpec(max_epochs=30, lr=1e-2, batch_size=32, check_every=10, warmup_steps=10),
        settings={name: {"max_steps": 10} for name in METHODS}, output=None, workers=1)
    return replace(base, **overrides)


def training_set(task: FactsTask, role: str) -> tuple[torch.Tensor, Sequences]:
    """The persons a model is trained on (all, or all but the forget persons) and its sequences."""
    persons = task.persons(*(("forget",) if role == "original" else ()), "validation", "unseen", "retain")
    sequences = Sequences.concat([task.facts(persons, answer_only=True), task.copy("train"), task.successor(4)])
    return persons, sequences


def trained_model(config: FactsConfig, seed: int, role: str, progress: Progress | None = None):
    """``(model, info)``: the seed's original or retrained model, from the cache when there."""
    task = FactsTask(config.spec, seed)
    persons, sequences = training_set(task, role)
    key = {"role": role, "seed": seed, **spec_key(config.spec, config.model, config.train)}

    def build():
        return gpt2(task.vocab.size, config.model, seed)

    def train(model):
        start = time.perf_counter()
        info = train_language_model(model, sequences, config.train, seed,
                                    done=lambda m: knows_facts(m, task, persons, config.train.target), progress=progress,
                                    label=f"seed {seed}: {role}")
        return {**info, "seconds": time.perf_counter() - start}

    return cached_model(config.output, key, build, train)


def unlearning_context(task: FactsTask) -> UnlearningContext:
    retain = Sequences.concat([task.facts(task.persons("retain"), answer_only=True), task.copy("train"),
                               task.successor(4)])
    return UnlearningContext(task, task.facts(task.persons("forget"), answer_only=True), retain,
                             task.facts(task.persons("forget")))


def run_method(config: FactsConfig, seed: int, name: str, lr: float | None = None) -> dict:
    """Pick the learning rate on the validation persons (unless ``lr`` is given), then
    evaluate the chosen run."""
    torch.set_num_threads(1)
    task = FactsTask(config.spec, seed)
    original, _ = trained_model(config, seed, "original")
    retrained, _ = trained_model(config, seed, "retrain")
    reference = truth_ratios(retrained, task, task.persons("forget"))
    context = unlearning_context(task)
    method = METHODS[name]
    base = method_settings(name, config.settings.get(name))
    grid = (lr,) if lr is not None else (base["lr"],) if "lr" in base else method.lr_grid
    validation = task.facts(task.persons("validation"))
    best, tried = None, []
    start = time.perf_counter()
    for rate in grid:
        torch.manual_seed(seed)
        began = time.perf_counter()
        model, info = method.run(original, context, {**base, "lr": rate}, seed)
        score = knows_fraction(model, validation)
        tried.append({"lr": rate, "validation_accuracy": score, "seconds": time.perf_counter() - began, **info})
        # reaching the stop rule first; short of it, the least forget accuracy left; then the validation persons kept
        reached = bool(info.get("reached"))
        rank = (reached, 0.0 if reached else -info["final_forget_accuracy"], score)
        if best is None or rank > best[0]:
            best = (rank, model, info, rate, tried[-1]["seconds"])
    _, model, info, lr, seconds = best
    return {"seed": seed, "method": name, "lr": lr, "tried": tried, "seconds": seconds,
            "search_seconds": time.perf_counter() - start, "metrics": evaluate(model, task, reference), "info": info}


def knows_fraction(model, sequences: Sequences) -> float:
    return 100.0 * answer_log_probs(model, sequences)[1].float().mean().item()


def reference_rows(config: FactsConfig, seed: int) -> list[dict]:
    """The original's and the retrained model's rows of one seed."""
    torch.set_num_threads(1)
    task = FactsTask(config.spec, seed)
    models = {role: trained_model(config, seed, role) for role in ROLES}
    reference = truth_ratios(models["retrain"][0], task, task.persons("forget"))
    return [{"seed": seed, "method": role, "lr": None, "seconds": info.get("seconds", 0.0), "tried": [],
             "metrics": evaluate(model, task, reference), "info": info} for role, (model, info) in models.items()]


def _train_job(config: FactsConfig, seed: int, role: str) -> dict:
    torch.set_num_threads(1)
    return trained_model(config, seed, role)[1]


def run_facts(config: FactsConfig, progress: Progress | None = None) -> dict:
    """Run the benchmark; returns the raw results (JSON-ready)."""
    say = progress or (lambda message: None)
    start = time.perf_counter()
    first = FactsTask(config.spec, config.seeds[0])
    say(first.describe(seed=False) + f"; methods: {', '.join(config.methods)}; seeds: {', '.join(map(str, config.seeds))}")
    if config.output is not None:
        Path(config.output).mkdir(parents=True, exist_ok=True)
    jobs = [(seed, role) for seed in config.seeds for role in ROLES]
    with _pool(config.workers) as pool:
        trained = _map(pool, [(_train_job, (config, s, r)) for s, r in jobs])
        for (seed, role), info in zip(jobs, trained):
            say(f"seed {seed}: {role} " + ("cached" if "cached" in info else f"trained in {info['seconds']:.0f} s, "
                                           f"{info['epochs']} epochs")
                + ("" if info.get("converged", True) else f", BELOW its target of {config.train.target} % (max_epochs reached)"))
        rest = config.seeds[1:]
        picking = config.seeds if config.pick_lr_each_seed else config.seeds[:1]
        pickers = [(run_method, (config, seed, name)) for seed in picking for name in config.methods]
        done = _map(pool, [(reference_rows, (config, s)) for s in config.seeds] + pickers, lambda r: _report(r, say))
        references, results = done[:len(config.seeds)], done[len(config.seeds):]
        if not config.pick_lr_each_seed and rest:
            picked = {r["method"]: r["lr"] for r in results}
            results += _map(pool, [(run_method, (config, seed, name, picked[name])) for seed in rest
                                   for name in config.methods], lambda r: _report(r, say))
    rows = [row for rows in references for row in rows] + results
    return {
        "config": _jsonable(asdict(config)),
        "task": first.describe(seed=False),
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "environment": {"torch": torch.__version__, "workers": config.workers, "python": sys.version.split()[0],
                        "platform": platform.platform(), "cpus": multiprocessing.cpu_count()},
    }


def _brief(result: dict) -> str:
    m = result["metrics"]
    return (f"seed {result['seed']}: {result['method']} lr {result['lr']:g}, {result['info']['steps']} steps: forget "
            f"{m['forget_accuracy']:.1f} %, retain {m['retain_accuracy']:.1f} %, unseen {m['unseen_accuracy']:.1f} %, "
            f"copy {m['copy_accuracy']:.1f} % ({result['seconds']:.0f} s)")


class _InProcess:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers <= 1:
        return _InProcess()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _map(pool, calls: list[tuple], each=None) -> list:
    """``function(*arguments)`` for every ``(function, arguments)`` of ``calls``, in order;
    ``each(result)`` as results arrive (in order)."""
    if pool is None:
        results = []
        for function, arguments in calls:
            results.append(function(*arguments))
            if each is not None:
                each(results[-1])
        return results
    futures = [pool.submit(function, *arguments) for function, arguments in calls]
    results = []
    for future in futures:
        results.append(future.result())
        if each is not None:
            each(results[-1])
    return results


def _report(result, say) -> None:
    if isinstance(result, dict):
        say(_brief(result))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
