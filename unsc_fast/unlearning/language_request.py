"""What ``unlearn()`` does differently for a language model's request: telling one from a
classifier's, its defaults, its objective, its data slices and its stop rule's measure.

Defaults (``LANGUAGE_DEFAULTS``, measured on the facts benchmark's validation persons:
docs/language_models.md) replace the classifier preset's where the caller leaves a value
unset: the targets are kept (relabelling is a classifier idea), the objective is NPO against
the frozen original (plus the retain NLL, heavily weighted, when there is retain data), the protection starts at a higher threshold, and the stop rule measures
scored tokens (``language.correct_tokens``, special tokens left out) on the forget data, with a guard of held-out
remaining sequences. The loop runs on its own seeded random stream (``seeded``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F

from unsc_fast.objectives.base import as_objective
from unsc_fast.objectives.causal_lm import NAMES, NPO, GradDiff, language_objective
from unsc_fast.training import model_device
from unsc_fast.unlearning import language
from unsc_fast.unlearning.data import batches_guard
from unsc_fast.unlearning.stopping import Monitor, StopRule
from unsc_fast.unlearning.targets import CLASSIFIER_RULES

DEFAULT_OBJECTIVE = "npo"  # without retain data; with it, GradDiff(NPO(), DEFAULT_RETAIN_WEIGHT)
# The projection removes the retain NLL's gradient inside the protected subspace (its rows are
# combinations of the retain inputs), so the retain term acts only in the directions the
# threshold leaves free, where it pulls damage back; a large weight is what makes it count there
# (facts benchmark, validation persons: docs/language_models.md).
DEFAULT_RETAIN_WEIGHT = 100.0
LANGUAGE_DEFAULTS = dict(threshold=0.999, epochs=50, lr=0.1, momentum=0.9, batch_size=32, criterion="per_label",
                         adaptive=False, features=0.0, distill=0.0,
                         # the guard's tolerance the LM defaults were chosen with (the classifiers' moved to 1.0)
                         stop=StopRule(forget_target=2.0, holdout=0.0, guard=0.1, tolerance=0.5, check_every=1))


def is_language_request(forget, objective, labels) -> bool:
    """Whether ``unlearn(forget, objective=..., labels=...)`` is a language model's request;
    clear errors where a classifier rule meets language-model data or the other way round."""
    data = language.is_language_data(forget)
    wants = getattr(objective, "language_model", False) or (isinstance(objective, str) and objective in NAMES
                                                            and objective != "ascent")
    if data is False and wants:
        raise ValueError(f"objective={objective!r} is a language-model objective, but the forget data is a "
                         "classifier's (one target per sample): it needs token sequences ((B, T) token ids with "
                         "per-token labels, a Hugging Face dict batch, or a loader of them)")
    if data and labels in CLASSIFIER_RULES:
        raise ValueError(f"labels={labels!r} relabels a classifier's samples, but the forget data is a language "
                         "model's (one target per token): leave labels unset (the targets are kept) and choose "
                         "what is minimised with objective='npo' (default), 'graddiff' or 'ascent'")
    return bool(data) or bool(wants)


def resolve_objective(objective, loss, has_retain: bool = False):
    """The Step objective of a language-model request: a name (``"npo"``, ``"graddiff"``,
    ``"ascent"``) or an objective object; ``None`` is the default: NPO, plus the retain NLL at
    ``DEFAULT_RETAIN_WEIGHT`` (``GradDiff(NPO(), ...)``) when there is retain data. A ``loss=``
    of the user's keeps its old meaning (minimised, or maximised with ``"ascent"``)."""
    default_loss = loss is F.cross_entropy
    if objective is None:
        if not default_loss:
            return as_objective(loss, None)
        if has_retain:
            return GradDiff(NPO(), retain_weight=DEFAULT_RETAIN_WEIGHT)
        return language_objective(DEFAULT_OBJECTIVE)
    if isinstance(objective, str):
        if not default_loss and objective == "ascent":
            return as_objective(loss, objective)
        if not default_loss:
            raise ValueError(f"objective={objective!r} computes its own loss from the token labels; leave loss= unset")
        return language_objective(objective)
    return as_objective(loss, objective)


def split_data(forget, remain, guard, stop_rule: StopRule | None, seed: int, retain=None):
    """``(forget_measured, guard, observed_remain)``: in-memory remaining data loses a seeded
    ``stop_rule.guard`` share of its sequences, never observed nor trained on (the guard),
    unless a ``guard`` is given; a loader is used whole, and its first batches (of ``remain``,
    else of ``retain``) guard the run though they are observed or trained on too
    (``data.batches_guard``)."""
    forget_measured = language.normalised(forget) if language.in_memory(forget) else forget
    if guard is not None:
        return forget_measured, (language.normalised(guard) if language.in_memory(guard) else guard), remain
    if stop_rule is None or stop_rule.guard <= 0:
        return forget_measured, None, remain
    if not language.in_memory(remain):
        source = remain if remain is not None else retain
        return forget_measured, batches_guard(source, stop_rule.guard), remain
    held, rest = language.split_off(language.normalised(remain), stop_rule.guard, torch.Generator().manual_seed(seed))
    return forget_measured, held, rest


def monitor(forget_measured, guard, original, model) -> Monitor:
    """Scored tokens on the guard; on the forget data, all but the model's special tokens
    (``language.special_token_ids``: an end-of-sequence token is not the fact being forgotten)."""
    skip = language.special_token_ids(model)
    forget_correct = functools.partial(language.correct_tokens, skip=skip) if skip else None
    return Monitor(language.correct_tokens, [forget_measured], guard, original, forget_correct=forget_correct)


def retain_data(objective, retain, observed_remain, batch_size: int, seed: int):
    """The retain batches of an objective that ``needs_retain`` (GradDiff): ``retain=``, else the
    observed remaining data (the guard left out); None when the objective needs none."""
    if not getattr(objective, "needs_retain", False):
        return retain
    data = retain if retain is not None else observed_remain
    if data is None:
        raise ValueError(f"objective {objective!r} needs retain data: pass retain=... (or remain=...) to unlearn()")
    return language.batches(data, batch_size, shuffle=True, seed=seed + 1)


@contextlib.contextmanager
def seeded(seed: int, model) -> Iterator[None]:
    """Run the loop on its own random stream seeded by ``seed`` (dropout draws from it: a model
    from config is in train mode), leaving the caller's global state as it was: the same call
    gives the same model whatever the global random state."""
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
