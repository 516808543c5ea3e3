"""The UNSC unlearning procedure: new targets for the forget data + null-space-confined fine-tuning.

1. Targets (``labels=``): for a classifier, calibrate (UNSC's rule: relabel each forget
   sample with the original model's most likely class among the classes that remain; its
   own label and every forgotten class are ruled out; the "second best" rule of the UNSC
   code, generalised to several forgotten classes), draw random allowed labels (ablation),
   or any ``relabel(inputs, targets) -> targets`` callable. Relabelling is a classifier
   idea; for a language model keep the targets (``labels="keep"``) and choose what is
   minimised with ``loss=`` / ``objective=`` (e.g. ``objective="ascent"`` on the forget
   tokens, or ``loss`` against a provided target sequence).
2. Project: fine-tune on the forget data with every tracked weight update confined to the
   null space of the remaining data's layer inputs, untracked parameters frozen by default
   and BatchNorm statistics fixed, so the remaining data's outputs do not move.

Data is either ``(x, y)`` tensors or any iterable of batches (a ``DataLoader``): tuples
``(inputs, targets, ...)`` or dicts of keyword inputs (``"labels"`` the targets); batches
are moved to the model's device.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.calibration import calibrated_labels, random_labels
from unsc_fast.projector.optimizer import NullSpaceOptimizer
from unsc_fast.projector.projector import NullSpaceProjector
from unsc_fast.room import NoRoomError, selectivity
from unsc_fast.training import Loss, Objective, Progress, batch_parts, fit, make_loader, model_device, predict_logits

LABEL_RULES = ("calibrate", "random", "keep")
Relabel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PRESETS = {
    # the library's own: benchmarks/sweep_unsc_defaults.py on validation splits of digits and
    # MNIST-1D (the only grid point forgetting both, <= 1 %, with the best remaining accuracy)
    "default": dict(threshold=0.97, epochs=10, lr=0.01, momentum=0.9, batch_size=32, basis="energy",
                    class_thresholds=None),
    # the official code's CIFAR-10 / All-CNN run (cifar10-allcnn_comparison_with_baselines.ipynb)
    "official": dict(threshold=0.997, epochs=25, lr=0.04, momentum=0.0, batch_size=512, basis="incremental",
                     class_thresholds=None),
}


@dataclass
class UnlearnResult:
    """What ``unlearn`` did: the (in-place) unlearned model, the projector, and the targets
    trained on (tensor-form forget data only; None for a loader, whose batches are relabelled
    on the fly)."""

    model: nn.Module
    projector: NullSpaceProjector | None
    labels: torch.Tensor | None
    seconds: float
    losses: list[float] = field(default_factory=list)


def is_tensor_pair(data) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


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
    calibrate: bool = True,
    labels: str | Relabel | None = None,
    loss: Loss = F.cross_entropy,
    objective: str | Objective | None = None,
    project: bool = True,
    untracked: str = "freeze",
    seed: int = 0,
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

    ``labels``: ``"calibrate"`` (default; ``calibrate=False`` means ``"random"``),
    ``"random"``, ``"keep"`` or ``relabel(inputs, targets) -> targets``. ``loss(outputs,
    targets)`` (default cross-entropy; ``training.causal_lm_loss`` for a causal LM);
    ``objective``: ``None`` (minimise the loss), ``"ascent"`` (maximise it) or
    ``objective(loss, fraction_done)``. ``untracked``: see ``NullSpaceOptimizer``.
    ``progress_bar``: tqdm bars on observation and epochs (None: on a terminal, after 2 s).

    ``preset`` fills the hyperparameters left as ``None`` (``PRESETS``): ``"default"`` the
    library's own (chosen on a validation split, docs/fidelity.md), ``"official"`` the
    official code's CIFAR-10 run (plain SGD, batch 512, 25 epochs, lr 0.04, the basis grown
    class by class with rising thresholds: ``NullSpaceProjector.build_incremental``; an
    explicit ``threshold`` becomes every class's threshold).

    A sample-wise request (no ``forget_classes``) is refused with ``NoRoomError`` when in no
    layer the forget samples have ``min_selectivity`` times more of their input energy outside
    the protected subspace than the remaining samples (``unsc_fast.room``): the remaining
    samples of the same classes usually span the same inputs, and the projected fine-tuning
    would then change nothing (a silent no-op). ``min_selectivity=0`` disables the check.
    """
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    hp = PRESETS[preset]
    basis_rule, explicit_threshold = None, threshold
    if hp["basis"] == "incremental":
        basis_rule = hp["class_thresholds"] if threshold is None else threshold
    threshold, epochs, lr, momentum, batch_size = (
        hp[name] if value is None else value
        for name, value in (("threshold", threshold), ("epochs", epochs), ("lr", lr), ("momentum", momentum),
                            ("batch_size", batch_size)))
    rule = labels if labels is not None else ("calibrate" if calibrate else "random")
    if not callable(rule) and rule not in LABEL_RULES:
        raise ValueError(f"labels must be one of {LABEL_RULES} or a callable, got {rule!r}")
    forget_classes = sorted({int(c) for c in (forget_classes or ())})
    generator = torch.Generator().manual_seed(seed)
    if is_tensor_pair(forget):
        new_labels = _tensor_targets(model, forget, rule, forget_classes, num_classes, generator)
        batches = make_loader(forget[0], new_labels, batch_size, shuffle=True, seed=seed)
    else:
        new_labels = None
        batches = _Relabelled(forget, _relabel_rule(model, rule, forget_classes, num_classes, generator))

    if project:
        projector = _ready_projector(model, projector, remain, forget, forget_classes, threshold, progress,
                                     progress_bar, basis_rule=basis_rule, incremental=hp["basis"] == "incremental",
                                     explicit_threshold=explicit_threshold)
        if not forget_classes and min_selectivity > 0:
            _refuse_without_room(model, projector, forget, min_selectivity)
        inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        optimizer: torch.optim.Optimizer = NullSpaceOptimizer(inner, projector, untracked=untracked)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    losses = fit(model, batches, optimizer, epochs=epochs, loss=loss, objective=_objective(objective),
                 freeze_batchnorm=True, progress=progress, label="unlearn", progress_bar_enabled=progress_bar)
    return UnlearnResult(model, projector if project else None, new_labels, time.perf_counter() - start, losses)


def _objective(objective):
    if objective is None or callable(objective):
        return objective
    if objective == "ascent":
        return lambda value, _fraction: -value
    raise ValueError(f"objective must be None, 'ascent' or a callable, got {objective!r}")


def _tensor_targets(model, forget, rule, forget_classes, num_classes, generator) -> torch.Tensor:
    """New targets for the whole in-memory forget set, before any training step."""
    x_forget, y_forget = forget
    if len(x_forget) != len(y_forget):
        raise ValueError(f"forget inputs ({len(x_forget)}) and labels ({len(y_forget)}) differ in length")
    if len(x_forget) == 0:
        raise ValueError("the forget set is empty")
    if rule == "keep":
        return y_forget
    if callable(rule):
        return rule(x_forget, y_forget)
    if rule == "calibrate":
        return calibrated_labels(model, x_forget, y_forget, forget_classes)
    if num_classes is None:
        num_classes = int(predict_logits(model, x_forget[:1]).shape[1])
    return random_labels(y_forget, num_classes, forget_classes, generator)


def _relabel_rule(model, rule, forget_classes, num_classes, generator) -> Relabel | None:
    """Per-batch relabelling for a loader. Calibration asks a frozen copy of the original model
    (the model itself changes while training; a loader's order may change per epoch, so the
    targets cannot be computed once up front without holding the whole forget set)."""
    if rule == "keep":
        return None
    if callable(rule):
        return rule
    if rule == "calibrate":
        original = copy.deepcopy(model).requires_grad_(False)
        return lambda x, y: calibrated_labels(original, x, y, forget_classes).to(y.device)

    def draw(x, y):
        classes = num_classes if num_classes is not None else int(predict_logits(model, x[:1]).shape[1])
        return random_labels(y, classes, forget_classes, generator).to(y.device)

    return draw


class _Relabelled:
    """Re-iterable view of a loader whose tuple batches get new targets (dict batches: new
    ``"labels"``)."""

    def __init__(self, loader, relabel: Relabel | None) -> None:
        self.loader, self.relabel = loader, relabel

    def __len__(self) -> int:
        return len(self.loader)  # TypeError for a loader without one: fit() then counts no steps

    def __iter__(self):
        seen = False
        for batch in self.loader:
            seen = True
            if self.relabel is None:
                yield batch
                continue
            args, kwargs, targets = batch_parts(batch)
            inputs = args[0] if args else next(iter(kwargs.values()))
            new = self.relabel(inputs, targets)
            yield {**batch, "labels": new} if isinstance(batch, dict) else (inputs, new, *batch[2:])
        if not seen:
            raise ValueError("the forget set is empty")


def _batches(data, size: int):
    return make_loader(data[0], data[1], batch_size=size) if is_tensor_pair(data) else data


def _refuse_without_room(model, projector, forget, min_selectivity: float) -> None:
    ratios = selectivity(model, projector, forget[0] if is_tensor_pair(forget) else forget)
    best = max(ratios.values(), default=0.0)
    if best < min_selectivity:
        raise NoRoomError(
            "sample-wise UNSC would be a no-op: the remaining samples span the same layer inputs as the "
            f"forget samples (forget/remaining energy outside the protected subspace: at most {best:.2f}x "
            f"in any layer, min_selectivity={min_selectivity}), so the null-space updates cannot move the "
            "forget samples without moving the remaining ones. Forget whole classes (forget_classes=...), "
            "or pass min_selectivity=0 to run anyway")


def _ready_projector(model, projector, remain, forget, forget_classes, threshold, progress, progress_bar, *,
                     basis_rule=None, incremental: bool = False, explicit_threshold: float | None = None):
    """Observe ``remain`` if given, then (re)build for this request.

    A ``statistics="total"`` projector gets one pass over the forget data, subtracted by the
    build. A built per-label projector with no new data and no class to exclude is used as it is.
    """
    if projector is None:
        if remain is None:
            raise ValueError("project=True needs remain=(x, y) to observe, or an observed projector")
        projector = NullSpaceProjector(model, threshold=threshold)
    device = model_device(model)
    if remain is not None:
        if progress is not None:
            progress(f"observing {len(remain[0]) if is_tensor_pair(remain) else 'the'} remaining samples")
        by_label = is_tensor_pair(remain) or bool(forget_classes)
        projector.collect(_batches(remain, 256), labels=by_label, device=device, progress=progress_bar)
    if projector.statistics == "total":
        if remain is not None:  # the total is the remaining data itself
            return projector.build()
        projector.reset_forget()
        projector.collect(_batches(forget, 256), labels=False, device=device, forget=True, progress=progress_bar)
        projector.build(exclude=forget_classes)
        projector.reset_forget()  # frees the pass; the next request brings its own
        return projector
    if remain is None and projector.built and not forget_classes:
        return projector
    observed = set(projector.groups)
    exclude = [c for c in forget_classes if c in observed]
    if incremental:  # the official pipeline's class-by-class basis (per-label statistics only)
        projector.build_incremental(exclude=exclude, class_thresholds=basis_rule)
    else:  # an explicit threshold= overrides a given projector's own
        projector.build(exclude=exclude, threshold=explicit_threshold)
    return projector
