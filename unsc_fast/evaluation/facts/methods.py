"""The unlearning methods of the facts benchmark, as OpenUnlearning runs them, with and
without the library's null-space protection.

Every method fine-tunes a copy of the original on the forget persons' facts (question tokens
``-100``, as OpenUnlearning's QA labels) with a loss from ``unsc_fast.objectives``:

* ``ga``: gradient ascent (OpenUnlearning's GradAscent);
* ``graddiff``: ascent on the forget batch + ``retain_weight`` x NLL of a retain batch (GradDiff);
* ``npo``: NPO against the original (``beta``) + the retain NLL (OpenUnlearning's NPO
  inherits GradDiff's retain term: ``alpha = gamma = 1``);

with OpenUnlearning's TOFU optimiser: AdamW, weight decay 0.01, a linear warm-up over one
epoch of the forget set, then linear decay to zero at the step budget (the Hugging Face
Trainer's default schedule), forget and retain batches of 32. The learning rate is picked per
method on the validation persons (``runner``). Each step is followed by a check of the forget
value accuracy; the run stops at ``stop_accuracy`` or after ``max_steps``.

``+nso`` variants protect the remaining data through the public API, the way a user would:
``NullSpaceProjector(statistics="total")``, ``collect`` over the data the unlearner has
(retain persons, general tasks and the forget persons), a forget pass
(``collect(forget, forget=True)``), ``build`` with a seeded generator, and
``NullSpaceOptimizer`` around the same AdamW. ``npo+nso-sgd`` swaps AdamW for SGD with
momentum (the issue's measured best recipe through the public API).

``unlearn`` is the library's own default LM unlearning, as a user calls it: ``unlearn(model,
forget, remain)`` on the Hugging Face batches (NPO against the frozen original plus 100 x the
retain NLL, per-label protection of the remaining data observed inside, SGD with momentum, its stop rule on the
forget data's scored tokens with a guard of held-out retain sequences), nothing tuned: its
one learning rate is the library's default. Other methods plug in the same way: one more entry
of ``METHODS`` (see ``register``), a runner ``(original, context, settings, seed) -> (model, info)``.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.evaluation.facts.data import FactsTask, Sequences
from unsc_fast.evaluation.facts.metrics import forget_accuracy
from unsc_fast.objectives import grad_diff_loss, gradient_ascent_loss, npo_loss, sequence_log_probs
from unsc_fast.unlearn import unlearn
from unsc_fast.unlearning.language_request import LANGUAGE_DEFAULTS

OBJECTIVES = ("ga", "graddiff", "npo")


@dataclass
class UnlearningContext:
    """What an unlearner is given: the forget data, its retain data (retain persons and the
    general tasks' training sequences) and the forget set's stop-rule sequences."""

    task: FactsTask
    forget: Sequences          # answer-only labels, every template
    retain: Sequences
    forget_check: Sequences    # the forget facts the stop rule grades


@dataclass
class Method:
    name: str
    title: str
    run: Callable
    defaults: dict = field(default_factory=dict)
    lr_grid: tuple = ()


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the benchmark (e.g. the library's own ``unlearn()`` once it has LM objectives)."""
    METHODS[method.name] = method
    return method


COMMON = dict(optimizer="adamw", weight_decay=0.01, momentum=0.9, batch_size=32, max_steps=200,
              warmup_steps=8, stop_accuracy=2.0, beta=0.1, retain_weight=1.0, forget_weight=1.0,
              protect=False, threshold=0.999, statistics_batch_size=256)


def cycle_batches(sequences: Sequences, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches (a new permutation per pass)."""
    while True:
        order = torch.randperm(len(sequences), generator=generator)
        yield from order.split(batch_size)


def protect(model: nn.Module, context: UnlearningContext, settings: dict, seed: int) -> NullSpaceProjector:
    """Total statistics over everything the unlearner has, less a forget pass (public API)."""
    projector = NullSpaceProjector(model, threshold=settings["threshold"], statistics="total")
    size = settings["statistics_batch_size"]
    everything = Sequences.concat([context.retain, context.forget])
    projector.collect(everything.batch(i) for i in torch.arange(len(everything)).split(size))
    projector.collect((context.forget.batch(i) for i in torch.arange(len(context.forget)).split(size)), forget=True)
    return projector.build(generator=torch.Generator().manual_seed(seed))


def make_optimizer(model: nn.Module, settings: dict, lr: float):
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings["weight_decay"])
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings["momentum"])
    raise ValueError(f"facts benchmark: optimizer must be adamw or sgd, got {settings['optimizer']!r}")


def warmup_then_linear(optimizer, warmup: int, total: int):
    """The Hugging Face Trainer's default: linear warm-up, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def reference_log_probs(model: nn.Module, sequences: Sequences, batch_size: int = 512) -> torch.Tensor:
    """The original's sequence log-probabilities of every forget sequence (NPO's reference),
    computed once: the reference model is frozen, so a step only looks them up."""
    parts = []
    with torch.no_grad():
        for index in torch.arange(len(sequences)).split(batch_size):
            batch = sequences.batch(index)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            parts.append(sequence_log_probs(logits, batch["labels"]))
    return torch.cat(parts)


def objective_unlearning(original: nn.Module, context: UnlearningContext, settings: dict, seed: int,
                         objective: str) -> tuple[nn.Module, dict]:
    """One run: ``objective`` on the forget data (plus the retain term where it has one)."""
    model = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(seed)
    info: dict = {}
    reference = reference_log_probs(original, context.forget) if objective == "npo" else None
    optimizer = make_optimizer(model, settings, settings["lr"])
    if settings["protect"]:
        projector = protect(model, context, settings, seed)
        info["ranks"] = {name: rank for name, rank in projector.ranks().items()}
        optimizer = NullSpaceOptimizer(optimizer, projector)
    schedule = warmup_then_linear(optimizer, settings["warmup_steps"], settings["max_steps"])
    forget_batches = cycle_batches(context.forget, settings["batch_size"], generator)
    retain_batches = cycle_batches(context.retain, settings["batch_size"], generator)
    uses_retain = objective in ("graddiff", "npo") and settings["retain_weight"] > 0
    accuracy, steps = forget_accuracy(model, context.task, context.forget_check), 0
    model.train()
    for steps in itertools.count(1):
        if accuracy <= settings["stop_accuracy"] or steps > settings["max_steps"]:
            steps -= 1
            break
        index = next(forget_batches)
        batch = context.forget.batch(index)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if objective == "npo":
            loss = npo_loss(logits, batch["labels"], reference[index], settings["beta"])
        else:
            loss = gradient_ascent_loss(logits, batch["labels"])
        if uses_retain:
            retain = context.retain.batch(next(retain_batches))
            retain_logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
            loss = grad_diff_loss(loss, retain_logits, retain["labels"], settings["retain_weight"],
                                  settings["forget_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        accuracy = forget_accuracy(model, context.task, context.forget_check)
        if not torch.isfinite(loss):
            info["diverged"] = True
            break
    model.eval()
    info.update(steps=steps, final_forget_accuracy=accuracy, reached=accuracy <= settings["stop_accuracy"])
    return model, info


def _objective_method(name: str, title: str, objective: str, lr_grid: tuple, **overrides) -> Method:
    def run(original, context, settings, seed):
        return objective_unlearning(original, context, settings, seed, objective)
    return register(Method(name, title, run, {**COMMON, **overrides}, lr_grid))


# Learning rates tried on the validation persons. One AdamW grid for every AdamW variant; a
# projected AdamW step keeps a fraction of each update, so its best rates sit at the top of
# it, an unprotected one's at the bottom. SGD's rates are larger: the forget facts are
# memorised (p ~ 1), where ascent's and NPO's gradients (~ 1 - p) are tiny.
ADAMW_GRID = (1e-3, 3e-3, 1e-2)
SGD_GRID = (0.03, 0.1, 0.3)
_objective_method("ga", "GA (AdamW)", "ga", ADAMW_GRID)
_objective_method("graddiff", "GradDiff (AdamW)", "graddiff", ADAMW_GRID)
_objective_method("npo", "NPO (AdamW)", "npo", ADAMW_GRID)
_objective_method("ga+nso", "GA + NullSpaceOptimizer(AdamW)", "ga", ADAMW_GRID, protect=True)
_objective_method("graddiff+nso", "GradDiff + NullSpaceOptimizer(AdamW)", "graddiff", ADAMW_GRID, protect=True)
_objective_method("npo+nso", "NPO + NullSpaceOptimizer(AdamW)", "npo", ADAMW_GRID, protect=True)
_objective_method("npo+nso-sgd", "NPO + NullSpaceOptimizer(SGD momentum)", "npo", SGD_GRID, protect=True,
                  optimizer="sgd", weight_decay=0.0)


def library_unlearning(original: nn.Module, context: UnlearningContext, settings: dict, seed: int,
                       **options) -> tuple[nn.Module, dict]:
    """The library's default: ``unlearn(model, forget, remain)``, only the step budget and the
    forget target given (the benchmark's ``max_steps`` and ``stop_accuracy``); ``objective``,
    ``threshold``, ``criterion`` (None: unlearn's defaults) and ``options`` (more ``unlearn``
    keywords, e.g. ``optimizer``: ``benchmarks/lm_variants.py``) are there to measure alternatives."""
    model = copy.deepcopy(original)
    rule = replace(LANGUAGE_DEFAULTS["stop"], max_steps=settings["max_steps"], forget_target=settings["stop_accuracy"])
    chosen = {key: settings[key] for key in ("objective", "threshold", "criterion") if settings[key] is not None}
    result = unlearn(model, context.forget.batch(), context.retain.batch(), lr=settings["lr"], stop=rule, seed=seed,
                     **chosen, **options)
    model.eval()
    accuracy = forget_accuracy(model, context.task, context.forget_check)
    info = {"steps": result.steps, "final_forget_accuracy": accuracy, "reached": accuracy <= settings["stop_accuracy"],
            "stop_reason": result.stop_reason, "objective": result.objective,
            "ranks": result.protection.get("ranks", {}), "threshold": result.protection.get("threshold")}
    return model, info


register(Method("unlearn", "unlearn() default (NPO + retain NLL, per-label protection, SGD momentum)", library_unlearning,
                dict(lr=LANGUAGE_DEFAULTS["lr"], max_steps=200, stop_accuracy=2.0, objective=None, threshold=None,
                     criterion=None)))


def method_settings(name: str, overrides: dict | None = None) -> dict:
    if name not in METHODS:
        raise KeyError(f"unknown facts method {name!r}; choose from {', '.join(METHODS)}")
    settings = dict(METHODS[name].defaults)
    for key, value in (overrides or {}).items():
        if key not in settings and key != "lr":
            raise KeyError(f"facts method {name!r} has no setting {key!r}; settings: {', '.join(sorted(settings))}")
        settings[key] = value
    return settings
