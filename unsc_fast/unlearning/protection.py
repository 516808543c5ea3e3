"""Getting a request's projector ready: observe the remaining data, build for this request,
rebuild it at another threshold, refuse a sample-wise request that leaves no room, and warn
where embedding rows only the forget data uses stay frozen."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from unsc_fast.projector import NullSpaceProjector
from unsc_fast.room import NoRoomError, selectivity
from unsc_fast.solve.per_label_classes import PerLabelUnavailable
from unsc_fast.training import batch_parts, eval_mode, make_loader, model_device, to_device
from unsc_fast.unlearning import language
from unsc_fast.unlearning.data import is_tensor_pair


def rebuilder(projector: NullSpaceProjector, exclude: list, criterion: str, generator, method: str):
    """The same request at another threshold (a total-statistics projector still holds its forget pass)."""
    def rebuild(threshold: float) -> None:
        projector.build(exclude=exclude, threshold=threshold, criterion=criterion, generator=generator, method=method)
    return rebuild


def batches_of(data, size: int, language_data: bool = False):
    if language_data:
        return language.batches(data, size)
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
                     criterion: str = "total", generator=None, method: str = "auto", language_data: bool = False):
    """Observe ``remain`` if given, then (re)build for this request; returns the projector and the
    criterion it was built with (per-label protection needs per-label statistics on one process).

    A ``statistics="total"`` projector gets one pass over the forget data, subtracted by the
    build. A built per-label projector with no new data and no class to exclude is used as it is.
    A language model's data (``language_data``) is observed as one group (no per-sample labels).
    """
    if projector is None:
        if remain is None:
            raise ValueError("project=True needs remain=(x, y) to observe, or an observed projector")
        projector = NullSpaceProjector(model, threshold=threshold)
    device = model_device(model)
    if remain is not None:
        if progress is not None:
            progress(f"observing {len(remain[0]) if is_tensor_pair(remain) else 'the'} remaining samples")
        by_label = None if language_data else is_tensor_pair(remain) or bool(forget_classes)
        projector.collect(batches_of(remain, 256, language_data), labels=by_label, device=device, progress=progress_bar)
    if criterion == "per_label" and (distributed_run() or (projector.statistics == "total" and not forget_classes)):
        # one total serves per-label protection only for a class-wise request (its class sketches
        # less the excluded labels); a sample-wise forget pass has rows of every kept label
        criterion = "total"
    options = dict(generator=generator, method=method)
    if projector.statistics == "total":
        if remain is not None:  # the total is the remaining data itself
            return projector, build_with(projector, criterion, **options)
        projector.reset_forget()
        projector.collect(batches_of(forget, 256, language_data), labels=False, device=device, forget=True,
                          progress=progress_bar)
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


def warn_frozen_forget_rows(model, projector: NullSpaceProjector, forget) -> None:
    """Warn when embedding rows that only the forget data uses are frozen by the build.

    An embedding's null space is the rows no kept data used. A build whose statistics hold the
    forget data itself (e.g. ``statistics="total"`` observed over all the training data, with no
    ``collect(forget, forget=True)`` pass to subtract) counts the forget data's own tokens as
    remaining: rows only it uses (a forgotten person's name) stay frozen, and unlearning must
    work around them. Detected here, where the forget data is known: the kept statistics count
    every row the forget data uses (at real tokens) at least as often as the forget data does
    (they hold it), and some row exactly as often (only the forget data uses it). Inputs shared
    by every sequence of a batch (position ids, (1, T)) are no request's own and are skipped.
    Costs one pass over ``forget``; nothing to do when a forget pass was subtracted.
    """
    if projector.forget_keys or not projector.built:
        return
    layers = {name: layer for name, layer in projector.layers.items()
              if isinstance(layer.module, nn.Embedding) and projector.protection.slot(layer.slot_name()).kind == "diagonal"}
    if not layers:
        return
    found = []
    for name, used in forget_token_counts(model, {n: l.module for n, l in layers.items()}, forget).items():
        kept = projector.store.kept_sum(layers[name].slot_name(), projector.built_from, required=False)
        if kept is None:
            continue
        kept, rows = kept.to(used), used > 0
        if not bool((kept[rows] >= used[rows]).all()):
            continue  # some row the forget data uses is kept less often: the forget data is not in the statistics
        only_forget = rows & (kept == used)
        if bool(only_forget.any()):
            found.append(f"{name!r}: {int(only_forget.sum())} of the {int((used > 0).sum())} rows the forget data uses")
    if found:
        warnings.warn(
            "unlearn(): embedding rows that only the forget data uses are frozen, because the statistics the "
            f"projector was built from hold the forget data itself ({'; '.join(found)}); they cannot change. "
            "Observe the remaining data only, or with statistics='total' add a forget pass "
            "(projector.collect(forget, forget=True)) before building (unlearn(remain=None, projector=...) does it)",
            UserWarning, stacklevel=3)


@torch.no_grad()
def forget_token_counts(model, modules: dict, batches) -> dict[str, torch.Tensor]:
    """Per embedding module: how often the batches look each row up at real tokens (float64)."""
    counts = {name: torch.zeros(module.num_embeddings, dtype=torch.float64) for name, module in modules.items()}
    state = {"mask": None, "batch": None}

    def hook(name):
        def record(_module, args, kwargs):
            indices = args[0] if args else kwargs.get("input")
            if not isinstance(indices, torch.Tensor) or indices.dim() == 0 or indices.shape[0] != state["batch"]:
                return  # shared by every sequence (position ids), or not a batch of tokens
            mask = state["mask"]
            rows = indices[mask.to(indices.device).bool()] if mask is not None and mask.shape == indices.shape \
                else indices.reshape(-1)
            counts[name] += torch.bincount(rows.cpu(), minlength=counts[name].numel()).to(torch.float64)
        return record

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in modules.items()]
    device = model_device(model)
    try:
        with eval_mode(model):
            for batch in batches:
                args, kwargs, _ = batch_parts(to_device(batch, device))
                tokens = args[0] if args else kwargs.get("input_ids")
                state["batch"] = tokens.shape[0] if isinstance(tokens, torch.Tensor) and tokens.dim() > 0 else None
                state["mask"] = kwargs.get("attention_mask")
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counts
