"""The UNSC unlearning procedure: new targets for the forget data + null-space-confined fine-tuning.

1. Targets (``labels=``): for a classifier, calibrate (UNSC's rule: relabel each forget
   sample with the original model's most likely class among the classes that remain; its
   own label and every forgotten class are ruled out; the "second best" rule of the UNSC
   code, generalised to several forgotten classes), by default in its soft form (the
   original's distribution over those classes, which leaves the samples as unsure as a
   retrained model is: docs/fidelity.md), draw random allowed labels (ablation),
   or any ``relabel(inputs, targets) -> targets`` callable. Relabelling is a classifier
   idea: a language model's data (token tensors, ``(tokens, labels)``, Hugging Face dicts;
   told from the data) keeps its targets, and ``objective=`` says what is minimised
   (by default NPO, plus the retain NLL at weight 100 when there is retain data;
   ``"npo"``, ``"graddiff"``, ``"ascent"`` or an object of
   ``unsc_fast.objectives.causal_lm``); its defaults and stop rule on scored tokens live in
   ``unsc_fast.unlearning.language_request`` (docs/language_models.md).
2. Protect: every tracked weight update is confined to the null space of the remaining data's
   layer inputs. The default protection gives every remaining label its own threshold of its
   own input energy in every layer (``build(criterion="per_label")``), starting at 0.99 and
   adapting to the request (``unsc_fast.unlearning.schedule``); untracked parameters are frozen
   and BatchNorm statistics fixed, so the remaining data's outputs do not move.
3. Stop when measured (``unsc_fast.unlearning.stopping``): when the forget data, including a
   held-out slice of it, is forgotten; backing off when a held-out guard slice of the remaining
   data shows damage; within a step budget. ``UnlearnResult`` says what was used and why it
   stopped.

Data is either ``(x, y)`` tensors or any iterable of batches (a ``DataLoader``): tuples
``(inputs, targets, ...)`` or dicts of keyword inputs (``"labels"`` the targets); batches
are moved to the model's device. The stop rule's slices are cut from tensors only.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.objectives import CrossEntropy, FeatureErasure, as_objective
from unsc_fast.objectives.classification import RetainDistillation
from unsc_fast.projector import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.room import NoRoomError  # noqa: F401 - where users catch it
from unsc_fast.training import Loss, Objective, Progress, batch_logits, make_loader, predict_logits
from unsc_fast.unlearning import language as lm
from unsc_fast.unlearning import language_request, loop
from unsc_fast.unlearning.data import (batches_guard, correct_predictions, endless, find_classifier, guard_size,
                                      head_inputs, held_out_loader, is_tensor_pair, request_slices, rereadable, split_guard)
from unsc_fast.unlearning.protection import batches_of, ready_projector, rebuilder, refuse_without_room, warn_frozen_forget_rows
from unsc_fast.unlearning.schedule import LEVELS, ProtectionSchedule
from unsc_fast.unlearning.stopping import Monitor, StopRule
from unsc_fast.unlearning.targets import CLASSIFIER_RULES, LABEL_RULES, Relabel, Relabelled, relabel_rule, tensor_targets

OPTIMIZERS = ("sgd", "adamw")

PRESETS = {
    # the library's own (docs/fidelity.md): per-label protection from 0.99, adapted to the request
    # (lowered while forgetting stalls, raised when the guard shows damage), SGD with momentum,
    # stopped by the stop rule within 50 passes over the forget data (at most 5 checks of feature
    # erasure once forgotten); feature erasure and retain distillation at weight 1; soft calibrated
    # targets (all chosen on the validation split: docs/fidelity.md)
    "default": dict(labels="soft", threshold=0.99, epochs=50, lr=0.01, momentum=0.9, batch_size=32, basis="energy",
                    class_thresholds=None, criterion="per_label", adaptive=True, stop=StopRule(), features=1.0,
                    distill=1.0),
    # the official code's CIFAR-10 / All-CNN run (cifar10-allcnn_comparison_with_baselines.ipynb):
    # a fixed number of epochs, no stop rule, no adaptation
    "official": dict(labels="calibrate", threshold=0.997, epochs=25, lr=0.04, momentum=0.0, batch_size=512, basis="incremental",
                     class_thresholds=None, criterion="total", adaptive=False, stop=None, features=0.0, distill=0.0),
}


@dataclass
class UnlearnResult:
    """What ``unlearn`` did: the (in-place) unlearned model, the projector, the targets trained
    on (tensor-form forget data: one per forget sample, in order, held-out ones included; None
    for a loader, whose batches are relabelled on the fly), and how the run went."""

    model: nn.Module
    projector: NullSpaceProjector | None
    labels: torch.Tensor | None
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean objective per pass over the forget data
    steps: int = 0
    epochs: float = 0.0  # passes over the (trained part of the) forget data
    stop_reason: str = "budget"  # "forgotten", "guard", "budget", "stalled", "callback"
    trajectory: list[dict] = field(default_factory=list)  # every check: step, threshold, lr, forget, guard damage
    protection: dict = field(default_factory=dict)  # criterion, thresholds used, final ranks
    holdout: torch.Tensor | None = None  # bool per forget sample (a loader: per sample of its dataset): held out of training, measured only
    objective: str = ""  # what was minimised (repr of the objective), e.g. "GradDiff(forget=NPO(beta=0.1), ...)"
    # what the stop rule's guard measured: "given" (``guard=``), "remain slice" (held out of
    # ``remain``: data the original trained on) or "none"; with its number of samples
    guard: str = "none"


def unlearn(
    model: nn.Module,
    forget,
    remain=None,
    *,
    forget_classes: Iterable[int] | None = None,
    num_classes: int | None = None,
    projector: NullSpaceProjector | None = None,
    preset: str = "default",
    threshold: float | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    batch_size: int | None = None,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    criterion: str | None = None,
    adaptive: bool | None = None,
    levels: Iterable[float] = LEVELS,
    stop: StopRule | None | str = "preset",
    guard=None,
    features: float | None = None,
    distill: float | None = None,
    evaluate: Callable | None = None,
    retain=None,
    calibrate: bool = True,
    labels: str | Relabel | None = None,
    loss: Loss = F.cross_entropy,
    objective: str | Objective | None = None,
    project: bool = True,
    untracked: str = "freeze",
    seed: int = 0,
    generator: torch.Generator | None = None,
    method: str = "auto",
    min_selectivity: float = 1.5,
    progress: Progress | None = None,
    progress_bar: bool | None = None,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` in place with UNSC; returns an ``UnlearnResult``.

    ``forget`` / ``remain``: ``(x, y)`` tensors or iterables of batches (see the module
    docstring). ``forget_classes`` makes it a class-wise request (those classes are never
    used as new labels and their covariances are left out of the basis); without it the
    request is sample-wise. ``remain`` is observed to build the projector unless a
    ``projector`` is given: a per-label one (already observed, or built) is rebuilt
    without the forgotten classes; a ``statistics="total"`` one, observed over the whole
    training data, gets one pass over ``forget`` and subtracts it (class- and sample-wise).

    Protection: ``criterion`` (``"per_label"``: every remaining label keeps ``threshold`` of its
    own input energy; ``"total"``: the summed covariance does), starting at ``threshold``;
    ``adaptive`` lets the stop rule move it along ``levels`` (``unsc_fast.unlearning.schedule``).
    Per-label protection needs per-label statistics on one process; elsewhere ``"total"`` is used.

    Stopping: ``stop`` (a ``StopRule``; ``None``: exactly ``epochs`` passes, as the official
    pipeline) measures the forget data and a guard of remaining data at every check; ``epochs``
    is then the budget. ``guard=(x, y)`` gives the guard explicitly (else a slice of tensor
    ``remain``, which the original trained on: held-out data it never saw reads real damage, not
    lost memorisation, and forgets more where the original over-fits; docs/fidelity.md; or the
    first batches of a ``remain`` loader, which are observed too: ``unlearning.data.batches_guard``;
    a ``forget`` DataLoader over a map-style dataset loses a held-out ``StopRule.holdout`` share, as
    tensors do: ``unlearning.data.held_out_loader``; other forget data is measured whole). A whole
    validation set may be given: its samples of the forgotten classes are left out of the guard
    and reported at every check (the trajectory's ``unseen``: points of them still right).
    ``evaluate(model, check)`` runs at every check and may return True to stop.

    ``features``: weight of the feature-erasure term (``unsc_fast.objectives.FeatureErasure``),
    which pulls the forget samples' classifier inputs out of the directions only they use.
    ``distill``: weight of retain distillation (``unsc_fast.objectives.RetainDistillation``): the
    original model's logits on ``remain`` are kept on a batch of remaining samples per step (tensors:
    computed once; a loader: batch by batch, read again each pass; skipped when ``retain`` is given).
    Both apply to tensors and to re-readable loaders (a ``DataLoader`` or a list of batches).

    ``labels``: ``"soft"`` (the default preset's: the original's distribution over the allowed
    classes, ``calibration.calibrated_distribution``), ``"calibrate"`` (its argmax, UNSC's rule and
    the official preset's), ``"random"`` (also ``calibrate=False``), ``"keep"`` or
    ``relabel(inputs, targets) -> targets``. ``loss(outputs,
    targets)`` (default cross-entropy; ``training.causal_lm_loss`` for a causal LM);
    ``objective``: ``None`` (minimise the loss), ``"ascent"`` (maximise it),
    ``objective(loss, fraction_done)``, or a ``Step`` objective (``unsc_fast.objectives``).
    ``optimizer``: ``"sgd"`` (with ``momentum``) or ``"adamw"`` (with ``weight_decay``).
    ``generator`` / ``method`` reach ``build`` (a seeded generator by default: the same call
    gives the same model whatever the global random state). ``untracked``: see
    ``NullSpaceOptimizer``. ``progress_bar``: tqdm bars (None: on a terminal, after 2 s).

    ``preset`` fills the hyperparameters left as ``None`` (``PRESETS``): ``"default"`` the
    library's own (docs/fidelity.md), ``"official"`` the official code's CIFAR-10 run (plain SGD,
    batch 512, 25 epochs, lr 0.04, the basis grown class by class with rising thresholds:
    ``NullSpaceProjector.build_incremental``; an explicit ``threshold`` becomes every class's).

    A sample-wise request (no ``forget_classes``) is refused with ``NoRoomError`` when in no
    layer the forget samples have ``min_selectivity`` times more of their input energy outside
    the protected subspace than the remaining samples (``unsc_fast.room``): the remaining
    samples of the same classes usually span the same inputs, and the projected fine-tuning
    would then change nothing (a silent no-op). ``min_selectivity=0`` disables the check.
    """
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    language_data = language_request.is_language_request(forget, objective, labels)
    if language_data and preset != "default":
        raise ValueError(f"preset={preset!r} is the classifier pipeline of the official code; a language model's "
                         "request runs the default preset")
    hp = {**PRESETS[preset], **language_request.LANGUAGE_DEFAULTS} if language_data else PRESETS[preset]
    if threshold is None and projector is not None:
        threshold = projector.threshold  # a given projector's own threshold is where protection starts
    basis_rule, explicit_threshold = None, threshold
    if hp["basis"] == "incremental":
        basis_rule = hp["class_thresholds"] if threshold is None else threshold
    threshold, epochs, lr, momentum, batch_size, criterion, adaptive, features, distill = (
        hp[name] if value is None else value
        for name, value in (("threshold", threshold), ("epochs", epochs), ("lr", lr), ("momentum", momentum),
                            ("batch_size", batch_size), ("criterion", criterion), ("adaptive", adaptive),
                            ("features", features), ("distill", distill)))
    rule_labels = labels if labels is not None else ("keep" if language_data else hp["labels"] if calibrate else "random")
    if not callable(rule_labels) and rule_labels not in LABEL_RULES:
        raise ValueError(f"labels must be one of {LABEL_RULES} or a callable, got {rule_labels!r}")
    classifier = rule_labels in CLASSIFIER_RULES
    stop_rule = _stop_rule(stop, hp, epochs, classifier or (language_data and labels is None))
    forget_classes = sorted({int(c) for c in (forget_classes or ())})
    generator = torch.Generator().manual_seed(seed) if generator is None else generator

    observed_remain = remain
    trained_forget, held_forget = forget, None  # the forget data's parts: trained on, held out (measured only)
    guard_data, unseen_forget = split_guard(guard, forget_classes) if not language_data else (guard, None)
    measured = stop_rule is not None and classifier
    holdout_mask, guard_mask = request_slices(
        forget[1] if measured and forget_classes and is_tensor_pair(forget) else None,
        remain[1] if measured and guard is None and is_tensor_pair(remain) and stop_rule.guard > 0 else None,
        stop_rule, seed)
    if language_data:  # token sequences (unsc_fast.unlearning.language): targets kept, a guard of sequences
        new_labels, batches = None, lm.batches(forget, batch_size, shuffle=True, seed=seed)
        forget_measured, guard_data, observed_remain = language_request.split_data(forget, remain, guard, stop_rule, seed,
                                                                                    retain)
    elif is_tensor_pair(forget):
        new_labels = tensor_targets(model, forget, rule_labels, forget_classes, num_classes,
                                     torch.Generator().manual_seed(seed))
        trained_labels = new_labels
        if holdout_mask is not None:
            trained_forget = (forget[0][~holdout_mask], forget[1][~holdout_mask])
            held_forget = (forget[0][holdout_mask], forget[1][holdout_mask]) if bool(holdout_mask.any()) else None
            trained_labels = new_labels[~holdout_mask]
        batches = make_loader(trained_forget[0], trained_labels, batch_size, shuffle=True, seed=seed)
    else:
        new_labels = None
        cut = held_out_loader(forget, stop_rule.holdout, seed) if measured and forget_classes else None
        if cut is not None:  # a map-style loader: the run trains on one part and also measures the other
            trained_forget, held_forget, holdout_mask = cut
        batches = Relabelled(trained_forget, relabel_rule(model, rule_labels, forget_classes, num_classes,
                                                            torch.Generator().manual_seed(seed)))
    if guard_mask is not None:
        guard_data = (remain[0][guard_mask], remain[1][guard_mask])
        observed_remain = (remain[0][~guard_mask], remain[1][~guard_mask])
    elif measured and guard is None and not is_tensor_pair(remain):
        guard_data = batches_guard(remain, stop_rule.guard)  # the first batches of a loader (observed too)

    base = language_request.resolve_objective(objective, loss, retain is not None or observed_remain is not None) \
        if language_data else None
    needs_reference = bool(getattr(base, "needs_reference", False))
    original = copy.deepcopy(model).requires_grad_(False) if stop_rule is not None or needs_reference else None
    schedule = ProtectionSchedule(None, levels, threshold) if project else ProtectionSchedule.off()
    erasure, head = None, None
    if project:
        projector, criterion = ready_projector(
            model, projector, observed_remain, forget, forget_classes, threshold, progress, progress_bar,
            basis_rule=basis_rule, incremental=hp["basis"] == "incremental", explicit_threshold=explicit_threshold,
            criterion=criterion, generator=generator, method=method, language_data=language_data)
        forget_batches = lm.batches(forget, 256) if language_data else forget
        warn_frozen_forget_rows(model, projector, batches_of(forget_batches, 256))
        if not forget_classes and min_selectivity > 0:
            refuse_without_room(model, projector, forget_batches, min_selectivity)
        if adaptive and stop_rule is not None and hp["basis"] != "incremental":
            exclude = forget_classes if projector.statistics == "total" else \
                [c for c in forget_classes if c in set(projector.groups)]
            schedule = ProtectionSchedule(rebuilder(projector, exclude, criterion, generator, method), levels, threshold)
        if features and classifier and (is_tensor_pair(forget) or rereadable(forget)):
            erasure, head = _feature_erasure(model, projector, forget, features)

        def make_optimizer(step_size: float) -> torch.optim.Optimizer:
            return NullSpaceOptimizer(_inner(model, optimizer, step_size, momentum, weight_decay), projector,
                                      untracked=untracked)
    else:
        def make_optimizer(step_size: float) -> torch.optim.Optimizer:
            return _inner(model, optimizer, step_size, momentum, weight_decay)

    if base is None:
        base = CrossEntropy() if (objective is None and loss is F.cross_entropy) else as_objective(loss, objective)
    if distill and classifier and retain is None and (is_tensor_pair(observed_remain) or rereadable(observed_remain)):
        base = RetainDistillation(base, distill)
        retain = _distillation_data(model, observed_remain, original)
    chosen = erasure if erasure is not None else base
    if erasure is not None:
        erasure.base = base
    monitor = None
    # what "still known" means on the forget data (StopRule.confidence); language models count tokens
    known_forget = functools.partial(correct_predictions, confidence=stop_rule.confidence) if stop_rule is not None else None
    if language_data:
        monitor = language_request.monitor(forget_measured, guard_data, original, model) if stop_rule is not None else None
        retain = language_request.retain_data(base, retain, observed_remain, batch_size, seed)
        if needs_reference:
            original.eval()
    elif stop_rule is not None and classifier and (is_tensor_pair(forget) or rereadable(forget)):
        parts = [trained_forget] + ([held_forget] if held_forget is not None else [])  # with their own labels
        measure = (lambda m: erasure.outside_share(head_inputs(head, m, parts[0]))) if erasure is not None else None
        monitor = Monitor(correct_predictions, parts, guard_data, original, measure, unseen=unseen_forget,
                          forget_correct=known_forget)
    rule = stop_rule if stop_rule is not None else StopRule(max_epochs=epochs, holdout=0.0, guard=0.0)
    try:
        retain_batches = make_loader(*retain, batch_size, shuffle=True, seed=seed) if is_tensor_pair(retain) else retain
        with language_request.seeded(seed, model) if language_data else contextlib.nullcontext():
            outcome = loop.run(model, batches, make_optimizer, lr, chosen, rule, schedule, monitor, head=head,
                               retain=retain_batches, reference=original if needs_reference else None,
                               on_protection=(lambda: erasure.calibrate(projector.basis(erasure.layer),
                                                                        erasure.start)) if erasure is not None else None,
                               evaluate=evaluate, progress=progress, progress_bar_enabled=progress_bar)
    finally:
        if project and projector.statistics == "total" and remain is None:
            projector.reset_forget()  # frees the pass; the next request brings its own
    protection = {}
    if project:
        visited = list(dict.fromkeys(c.threshold for c in outcome.trajectory)) or [projector.built_threshold]
        protection = {"criterion": criterion, "threshold": projector.built_threshold, "levels": visited,
                      "ranks": projector.ranks()}
    return UnlearnResult(model, projector if project else None, new_labels, time.perf_counter() - start,
                         outcome.losses, outcome.steps, outcome.epochs, outcome.reason,
                         [c.as_dict() for c in outcome.trajectory], protection, holdout_mask, repr(chosen),
                         _guard_source(guard, guard_data if monitor is not None else None,
                                       unseen_forget if monitor is not None else None))


def _guard_source(given, guard_data, unseen_forget=None) -> str:
    """``UnlearnResult.guard``: where the guard came from and, for in-memory data, its size (and
    how many of a given guard's samples were of the forgotten classes: the trajectory's ``unseen``)."""
    checked = f"; {len(unseen_forget[0])} of the forgotten classes reported" if unseen_forget is not None else ""
    if guard_data is None:
        return f"none{checked}"
    if given is not None:
        source = "given"
    elif isinstance(guard_data, list):
        source = f"remain batches (the first {len(guard_data)}, observed too)"
    else:
        source = "remain slice"
    try:
        return f"{source}, {guard_size(guard_data)} samples{checked}"
    except (AttributeError, KeyError, TypeError, IndexError):  # a given loader: its size is not known
        return source + checked


def _stop_rule(stop, preset: dict, epochs: int, classifier: bool) -> StopRule | None:
    """The run's stop rule: the preset's (default: ``StopRule()`` with ``epochs`` as its budget),
    ``None`` for exactly ``epochs`` passes. Targets kept as they are (``"keep"``, a callable) have no
    classifier accuracy to measure: they run ``epochs`` passes unless a rule is passed explicitly.
    A language model's request measures scored tokens instead, unless ``labels="keep"`` is spelled
    out (the earlier API's form, which keeps its fixed passes)."""
    if isinstance(stop, str):
        if stop != "preset":
            raise ValueError(f"stop must be a StopRule, None or 'preset', got {stop!r}")
        stop = preset["stop"]
        if stop is None or not classifier:
            return None
        return StopRule(**{**stop.__dict__, "max_epochs": epochs})
    if stop is not None and not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a StopRule or None, got {type(stop).__name__}")
    return stop


def _inner(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _distillation_data(model, remain, original):
    """Retain distillation's batches: the remaining inputs with the original model's logits as their
    targets; for tensors computed once, for a loader batch by batch as it is read (never held whole)."""
    if is_tensor_pair(remain):
        return remain[0], predict_logits(model, remain[0]).to(remain[0].device)
    reference = original if original is not None else copy.deepcopy(model).requires_grad_(False)
    return endless(Relabelled(remain, lambda args, kwargs, _y: batch_logits(reference, args, kwargs)))


def _feature_erasure(model, projector, forget, weight: float):
    """The feature-erasure objective for the classifier layer, or ``(None, None)`` with a warning
    when no tracked dense layer produces the logits. ``forget``: tensors or a re-readable loader."""
    found = find_classifier(model, projector.layers, forget)
    slot = projector.protection.slot(projector.layers[found[0]].slot_name()) if found is not None else None
    if found is None or slot.kind != "dense":
        warnings.warn("unlearn(features=...): no tracked dense layer produces the model's output; the "
                      "feature-erasure term is off", UserWarning, stacklevel=3)
        return None, None
    name, module = found
    erasure = FeatureErasure(None, weight)
    erasure.layer, erasure.start = name, head_inputs(module, model, forget)
    erasure.calibrate(projector.basis(name), erasure.start)
    return erasure, module


