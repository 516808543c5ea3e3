"""Getting a request's projector ready: observe the remaining data, build for this request,
rebuild it at another threshold, and refuse a sample-wise request that leaves no room."""
from __future__ import annotations

import warnings

import torch

from unsc_fast.projector import NullSpaceProjector
from unsc_fast.solve.per_label_classes import PerLabelUnavailable
from unsc_fast.room import NoRoomError, selectivity
from unsc_fast.training import make_loader, model_device
from unsc_fast.unlearning.data import is_tensor_pair


def rebuilder(projector: NullSpaceProjector, exclude: list, criterion: str, generator, method: str):
    """The same request at another threshold (a total-statistics projector still holds its forget pass)."""
    def rebuild(threshold: float) -> None:
        projector.build(exclude=exclude, threshold=threshold, criterion=criterion, generator=generator, method=method)
    return rebuild


def batches_of(data, size: int):
    return make_loader(data[0], data[1], batch_size=size) if is_tensor_pair(data) else data


def refuse_without_room(model, projector, forget, min_selectivity: float) -> None:
    ratios = selectivity(model, projector, forget[0] if is_tensor_pair(forget) else forget)
    best = max(ratios.values(), default=0.0)
    if best < min_selectivity:
        raise NoRoomError(
            "sample-wise UNSC would be a no-op: the remaining samples span the same layer inputs as the "
            f"forget samples (forget/remaining energy outside the protected subspace: at most {best:.2f}x "
            f"in any layer, min_selectivity={min_selectivity}), so the null-space updates cannot move the "
            "forget samples without moving the remaining ones. Forget whole classes (forget_classes=...), "
            "or pass min_selectivity=0 to run anyway")


def ready_projector(model, projector, remain, forget, forget_classes, threshold, progress, progress_bar, *,
                     basis_rule=None, incremental: bool = False, explicit_threshold: float | None = None,
                     criterion: str = "total", generator=None, method: str = "auto"):
    """Observe ``remain`` if given, then (re)build for this request; returns the projector and the
    criterion it was built with (per-label protection needs per-label statistics on one process).

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
        projector.collect(batches_of(remain, 256), labels=by_label, device=device, progress=progress_bar)
    if criterion == "per_label" and distributed_run():
        criterion = "total"
    options = dict(generator=generator, method=method)
    if projector.statistics == "total":
        if remain is not None:  # the total is the remaining data itself
            return projector, build_with(projector, criterion, **options)
        projector.reset_forget()
        projector.collect(batches_of(forget, 256), labels=False, device=device, forget=True, progress=progress_bar)
        # unlearn() resets the pass when the run ends
        return projector, build_with(projector, criterion, exclude=forget_classes, **options)
    if remain is None and projector.built and not forget_classes:
        return projector, criterion
    observed = set(projector.groups)
    exclude = [c for c in forget_classes if c in observed]
    if incremental:  # the official pipeline's class-by-class basis (per-label statistics only)
        projector.build_incremental(exclude=exclude, class_thresholds=basis_rule)
    else:  # an explicit threshold= overrides a given projector's own
        criterion = build_with(projector, criterion, exclude=exclude,
                               threshold=explicit_threshold if explicit_threshold is not None else threshold, **options)
    return projector, criterion


def build_with(projector: NullSpaceProjector, criterion: str, **options) -> str:
    """Build by ``criterion``; where per-label protection cannot be served from the statistics
    kept (one total without class sketches, a sample-wise forget pass under one total), warn
    and protect the summed energy instead. Returns the criterion the bases were built with."""
    try:
        projector.build(criterion=criterion, **options)
        return criterion
    except PerLabelUnavailable as error:
        warnings.warn(f"unlearn(): per-label protection is not available here ({error}); protecting the kept "
                      'data\'s summed energy instead (criterion="total")', UserWarning, stacklevel=4)
        projector.build(criterion="total", **options)
        return "total"


def distributed_run() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
