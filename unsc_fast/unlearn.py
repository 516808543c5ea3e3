"""The UNSC unlearning procedure: pseudo-label calibration + null-space-confined fine-tuning.

1. Calibrate: relabel each forget sample with the original model's most likely class among
   the classes that remain (its own label and every forgotten class are ruled out). This
   is the "second best" rule of the UNSC code, generalised to several forgotten classes.
2. Project: fine-tune on the relabelled forget samples with every Linear/Conv2d weight
   update confined to the null space of the remaining data's layer inputs, biases frozen
   and BatchNorm statistics fixed, so the remaining data's outputs do not move.

Each step can be switched off for ablations (``calibrate=False`` draws random labels;
``project=False`` fine-tunes freely).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from unsc_fast.calibration import calibrated_labels, random_labels
from unsc_fast.optimizer import NullSpaceOptimizer
from unsc_fast.projector import NullSpaceProjector
from unsc_fast.room import NoRoomError, selectivity
from unsc_fast.training import Progress, fit, make_loader, model_device, predict_logits


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
    """What ``unlearn`` did: the (in-place) unlearned model, the projector, the labels used."""

    model: nn.Module
    projector: NullSpaceProjector | None
    labels: torch.Tensor
    seconds: float
    losses: list[float] = field(default_factory=list)


def unlearn(
    model: nn.Module,
    forget: tuple[torch.Tensor, torch.Tensor],
    remain: tuple[torch.Tensor, torch.Tensor] | None = None,
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
    project: bool = True,
    seed: int = 0,
    min_selectivity: float = 1.5,
    progress: Progress | None = None,
) -> UnlearnResult:
    """Unlearn ``forget = (x, y)`` from ``model`` in place with UNSC; returns an ``UnlearnResult``.

    ``forget_classes`` makes it a class-wise request (those classes are never used as new
    labels and their covariances are left out of the basis); without it the request is
    sample-wise. ``remain = (x, y)`` is observed to build the projector unless a
    ``projector`` (already observed, or built) is given: a second request then needs no
    pass over the remaining data.

    ``preset`` fills the hyperparameters left as ``None`` (``PRESETS``): ``"default"`` the
    library's own (chosen on a validation split, docs/fidelity.md), ``"official"`` the
    official code's CIFAR-10 run (plain SGD, batch 512, 25 epochs, lr 0.04, the basis grown
    class by class with rising thresholds: ``NullSpaceProjector.build_incremental``).

    A sample-wise request (no ``forget_classes``) is refused with ``NoRoomError`` when in no
    layer the forget samples have ``min_selectivity`` times more of their input energy outside
    the protected subspace than the remaining samples (``unsc_fast.room``): the remaining
    samples of the same classes usually span the same inputs, and the projected fine-tuning
    would then change nothing (a silent no-op). ``min_selectivity=0`` disables the check.
    """
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    given = dict(threshold=threshold, epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size)
    hp = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}, "explicit_threshold": threshold}
    x_forget, y_forget = forget
    if len(x_forget) != len(y_forget):
        raise ValueError(f"forget inputs ({len(x_forget)}) and labels ({len(y_forget)}) differ in length")
    if len(x_forget) == 0:
        raise ValueError("the forget set is empty")
    forget_classes = sorted({int(c) for c in (forget_classes or ())})
    if num_classes is None:
        num_classes = int(predict_logits(model, x_forget[:1]).shape[1])
    generator = torch.Generator().manual_seed(seed)
    if calibrate:
        labels = calibrated_labels(model, x_forget, y_forget, forget_classes)
    else:
        labels = random_labels(y_forget, num_classes, forget_classes, generator)

    if project:
        projector = _ready_projector(model, projector, remain, forget_classes, hp, progress)
        if not forget_classes and min_selectivity > 0:
            ratios = selectivity(model, projector, x_forget)
            best = max(ratios.values(), default=0.0)
            if best < min_selectivity:
                raise NoRoomError(
                    "sample-wise UNSC would be a no-op: the remaining samples span the same layer inputs as the "
                    f"forget samples (forget/remaining energy outside the protected subspace: at most {best:.2f}x "
                    f"in any layer, min_selectivity={min_selectivity}), so the null-space updates cannot move the "
                    "forget samples without moving the remaining ones. Forget whole classes (forget_classes=...), "
                    "or pass min_selectivity=0 to run anyway")
        inner = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
        optimizer: torch.optim.Optimizer = NullSpaceOptimizer(inner, projector)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])

    loader = make_loader(x_forget, labels, hp["batch_size"], shuffle=True, seed=seed)
    losses = fit(model, loader, optimizer, epochs=hp["epochs"], freeze_batchnorm=True, progress=progress, label="unlearn")
    return UnlearnResult(model, projector if project else None, labels, time.perf_counter() - start, losses)


def _ready_projector(model, projector, remain, forget_classes, hp, progress) -> NullSpaceProjector:
    """Observe ``remain`` if given, then (re)build for this request's forgotten classes.

    A built projector with no new data and no class to exclude is used as it is.
    """
    if projector is None:
        if remain is None:
            raise ValueError("project=True needs remain=(x, y) to observe, or an observed projector")
        projector = NullSpaceProjector(model, threshold=hp["threshold"])
    if remain is not None:
        if progress is not None:
            progress(f"observing {len(remain[0])} remaining samples")
        projector.collect(make_loader(remain[0], remain[1], batch_size=256), device=model_device(model))
    elif projector.built and not forget_classes:
        return projector
    observed = set(projector.groups)
    exclude = [c for c in forget_classes if c in observed]
    if hp["basis"] == "incremental":
        # an explicit threshold= becomes every class's threshold rather than being ignored
        rule = hp["class_thresholds"] if hp["explicit_threshold"] is None else hp["explicit_threshold"]
        projector.build_incremental(exclude=exclude, class_thresholds=rule)
    else:
        projector.build(exclude=exclude, threshold=hp["explicit_threshold"])  # None: the projector's own
    return projector
