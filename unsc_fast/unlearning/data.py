"""What a request's data is split into before unlearning starts, and how the stop rule reads it.

For in-memory ``(x, y)`` tensors: a class-wise request's forget samples lose a held-out slice
(``StopRule.holdout``) that is never trained on and tells whether the forgetting carries over to
samples of the class the run did not see; the remaining samples lose a guard slice
(``StopRule.guard``) that is never observed and never trained on, the honest check of the
remaining classes. Both slices are drawn per class with the run's seed, at least one sample
per class where a class has two or more. A forget ``DataLoader`` over a map-style dataset loses
the same share of its samples (``held_out_loader``: per class where the dataset holds its labels,
else over the whole request, whose labels are not known before it is read); other forget data
(an iterable-style dataset, a custom batch sampler, a list of batches) is trained on and measured
whole. The guard
of a remaining loader is its first batches (``batches_guard``), which are observed too (no slice
is cut from a stream); held-out data passed as ``guard=`` is the honest check there.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from unsc_fast.training import batch_logits, batch_parts, leading_size


def is_tensor_pair(data) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


# A guard taken from batches: at most about this many samples (every check runs them all).
GUARD_SAMPLES = 2048


def rereadable(data) -> bool:
    """Batches that can be read again without being used up: a DataLoader or a list of batches
    (a generator is read once)."""
    return isinstance(data, DataLoader) or (isinstance(data, list) and len(data) > 0)


def endless(batches):
    """A re-readable loader's batches, pass after pass, read again each time (a DataLoader
    reshuffles; nothing is held in memory, where ``itertools.cycle`` would keep a whole pass)."""
    while True:
        seen = False
        for batch in batches:
            seen = True
            yield batch
        if not seen:
            raise ValueError("the retain data is empty")


def _samples_in(batch) -> int:
    """Samples in one batch: ``training.leading_size`` of its inputs, else its targets' length, else 1."""
    args, kwargs, targets = batch_parts(batch)
    size = leading_size(args, kwargs)
    if size is None and isinstance(targets, torch.Tensor) and targets.dim():
        size = int(targets.shape[0])
    return size or 1


def batches_guard(data, share: float, limit: int = GUARD_SAMPLES) -> list | None:
    """The guard of remaining data given as batches: its first batches as read, a ``share`` of
    them (at least one) and at most about ``limit`` samples. Without a slice to cut, they are
    observed too (and trained on by a retain term): they catch damage beyond what the protection
    holds (a step that wrecks the model, a class lost in the directions left free), not the
    finer losses held-out data shows (pass ``guard=`` for that). A loader is read on a forked
    random stream, leaving the global one as it was. None for data that is not ``rereadable``."""
    if share <= 0 or not rereadable(data):
        return None
    try:
        wanted = max(1, round(share * len(data)))
    except TypeError:  # a loader over an iterable-style dataset has no length
        wanted = None
    kept, samples = [], 0
    with torch.random.fork_rng(devices=[]):
        for batch in data:
            kept.append(batch)
            samples += _samples_in(batch)
            if (wanted is not None and len(kept) >= wanted) or samples >= limit:
                break
    return kept or None


def guard_size(guard) -> int:
    """Samples in a guard: ``(x, y)``, a token tensor, or a list of batches."""
    if isinstance(guard, list):
        return sum(_samples_in(batch) for batch in guard)
    samples = guard[0] if isinstance(guard, tuple) else guard["input_ids"] if isinstance(guard, Mapping) else guard
    return int(samples.shape[0])


def held_out(y: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of a per-class random ``share`` of the samples (labels ``y``), seeded."""
    mask = torch.zeros(len(y), dtype=torch.bool)
    if share <= 0:
        return mask
    labels = y.detach().cpu()
    for value in labels.unique().tolist():
        members = (labels == value).nonzero().flatten()
        count = int(round(share * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        chosen = members[torch.randperm(len(members), generator=generator)[:count]]
        mask[chosen] = True
    return mask


def dataset_labels(dataset) -> torch.Tensor | None:
    """A map-style dataset's integer labels, one per sample, where it holds them without reading a
    sample: a ``TensorDataset``'s second tensor or a ``targets`` attribute (torchvision's
    convention); None otherwise (reading every sample could decode every image)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    elif hasattr(dataset, "targets"):
        try:
            labels = torch.as_tensor(dataset.targets)
        except (TypeError, ValueError, RuntimeError):
            return None
    else:
        return None
    if labels.dim() != 1 or len(labels) != len(dataset) or labels.is_floating_point() or labels.is_complex():
        return None
    return labels


def held_out_loader(loader, share: float, seed: int) -> tuple[DataLoader, DataLoader, torch.Tensor] | None:
    """``(trained, held out, mask)``: a forget ``DataLoader`` over a map-style dataset cut into a
    loader of the samples the run trains on and one of a random ``share`` it only measures (at
    least one each where there are two or more), both with the loader's batch size, collation,
    workers and shuffling; ``mask`` marks the held-out indices of its dataset. The share is drawn
    per class, as for tensors (``held_out``), where the dataset states its labels without being
    read (``dataset_labels``), else over the whole request. None where nothing
    can be cut without changing what the loader means: ``share`` 0, not a DataLoader, an
    iterable-style dataset, a custom batch sampler or a sampler other than sequential or random
    without replacement over the whole dataset (one that draws a subset each pass)."""
    if share <= 0 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    sampler = loader.sampler
    if loader.batch_size is None or not isinstance(sampler, (RandomSampler, SequentialSampler)):
        return None
    size = len(loader.dataset)
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != size):
        return None
    if size < 2:
        return None
    labels = dataset_labels(loader.dataset)
    mask = held_out(labels, share, torch.Generator().manual_seed(seed)) if labels is not None else None
    if mask is None or not mask.any():  # no labels, or no class with two samples: the request as one class
        mask = held_out(torch.zeros(size, dtype=torch.long), share, torch.Generator().manual_seed(seed))
    shuffle = isinstance(sampler, RandomSampler)

    def rebuilt(indices: torch.Tensor, drop_last: bool) -> DataLoader:
        workers = loader.num_workers
        return DataLoader(Subset(loader.dataset, indices.tolist()), batch_size=loader.batch_size, shuffle=shuffle,
                          num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          drop_last=drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                          multiprocessing_context=loader.multiprocessing_context if workers else None,
                          generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None,
                          persistent_workers=loader.persistent_workers if workers else False)
    # the held-out part is measured, never trained on: every one of its samples is read
    return rebuilt((~mask).nonzero().flatten(), loader.drop_last), rebuilt(mask.nonzero().flatten(), False), mask


def request_slices(forget_labels: torch.Tensor | None, remain_labels: torch.Tensor | None, rule,
                   seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The forget hold-out and the guard slice of a request (bool masks), as ``unlearn()`` draws
    them: per class (``held_out``), from one generator seeded with ``seed``, the hold-out first.
    ``None`` labels draw nothing (and give None). The one owner of the draw order, so a benchmark
    that reproduces the default guard gets the very slice."""
    draws = torch.Generator().manual_seed(seed)
    holdout = held_out(forget_labels, rule.holdout, draws) if forget_labels is not None else None
    guard = held_out(remain_labels, rule.guard, draws) if remain_labels is not None else None
    return holdout, guard


def split_guard(guard, forget_classes) -> tuple:
    """A given guard ``(x, y)`` split by label: ``(remaining-class part, forgotten-class part)``.

    A validation set passed whole holds samples of the forgotten classes too. Read as guard
    samples they would count every forgotten one as damage; apart, they say how much of the
    class shows on data the original never trained on (reported, not a stop condition:
    docs/fidelity.md). Either part is None when empty; guards that are not tensor pairs, and
    sample-wise requests, come back whole."""
    if not forget_classes or not is_tensor_pair(guard):
        return guard, None
    x, y = guard
    forgotten = torch.isin(y, torch.tensor(sorted(forget_classes), dtype=y.dtype, device=y.device))
    parts = [(x[mask], y[mask]) if bool(mask.any()) else None for mask in (~forgotten, forgotten)]
    return parts[0], parts[1]


def input_batches(data, batch_size: int):
    """``(args, kwargs, targets)`` of ``data`` batch by batch: an ``(x, y)`` pair in chunks of
    ``batch_size``, or an iterable's batches as they come (``training.batch_parts``)."""
    if is_tensor_pair(data):
        x, y = data
        for start in range(0, len(x), batch_size):
            yield (x[start:start + batch_size],), {}, y[start:start + batch_size]
    else:
        for batch in data:
            yield batch_parts(batch)


@torch.no_grad()
def correct_predictions(model: nn.Module, data, batch_size: int = 512, confidence: float | None = None) -> torch.Tensor:
    """Per sample: does the model's most likely class equal its label (or, with ``confidence``,
    does the label keep at least that probability)? ``data``: ``(x, y)`` or an iterable of
    ``(inputs, labels, ...)`` batches. Eval mode, restored afterwards."""

    def known(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        flags = logits.argmax(-1) == labels
        if confidence is not None:  # (a negative label, an ignored position, is never known)
            own = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            flags |= (own >= math.log(confidence)) & (labels >= 0)
        return flags.cpu()

    flags = [known(batch_logits(model, args, kwargs), targets) for args, kwargs, targets in input_batches(data, batch_size)]
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def head_inputs(module: nn.Module, model: nn.Module, data, batch_size: int = 512) -> torch.Tensor:
    """The inputs of ``module`` (the classifier), flattened to (N, d), over ``data`` (as
    ``correct_predictions`` reads it), in eval mode."""
    recorded = []
    handle = module.register_forward_hook(lambda _m, args, _o: recorded.append(args[0].detach().flatten(1)))
    try:
        for args, kwargs, _ in input_batches(data, batch_size):
            batch_logits(model, args, kwargs)
    finally:
        handle.remove()
    return torch.cat(recorded)


def find_classifier(model: nn.Module, layers: dict, data) -> tuple[str, nn.Module] | None:
    """The tracked layer whose output is the model's output (its logits): the last tracked
    module called in a forward of ``data``'s first two samples (first batch, for an iterable)
    whose output has the logits' shape. None if there is none."""
    calls = []
    handles = [module.register_forward_hook(lambda m, _a, out, name=name: calls.append((name, m, out)))
               for name, module in ((n, a.module) for n, a in layers.items())]
    try:
        first = next(input_batches(data, 2), None)
        if first is None:
            raise ValueError("the forget set is empty")
        with torch.no_grad():
            logits = batch_logits(model, *first[:2])
    finally:
        for handle in handles:
            handle.remove()
    for name, module, out in reversed(calls):
        if isinstance(out, torch.Tensor) and out.shape == logits.shape:
            return name, module
    return None
