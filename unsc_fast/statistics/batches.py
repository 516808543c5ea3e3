"""Which labels ``collect()`` files a batch under, decided from the batch itself.

A classifier's batch ``(inputs, targets)`` has one target per sample: observed per label, so
that a class-wise request needs no new pass. A language model's batch has one target per
*token*: per-label statistics make no sense there, and splitting by token would be wrong, so
it is observed as one group. The rule (``labels=None``, the default):

* a dict batch (Hugging Face: ``input_ids``, ``attention_mask``, ``labels``) whose
  ``labels`` are per token (2-D or more), or that has none, is a language-model batch;
* a tuple batch ``(tokens, targets)`` with integer ``tokens`` (B, T) and ``targets`` of the
  same shape is a language-model batch;
* anything else with targets is a classifier batch: the targets are the labels (one per sample).

``labels=True`` insists on per-sample labels (a language-model batch is then an error),
``False`` never splits, and a string names a dict batch's entry holding one label per
sequence (e.g. a person or document id), which is taken out of the model's inputs.
"""
from __future__ import annotations

import torch


def is_token_ids(value) -> bool:
    """Token ids: an integer (non-floating, non-complex) tensor of shape (B, T)."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point() \
        and not value.is_complex()


def is_language_model_batch(args: tuple, kwargs: dict, targets) -> bool:
    """True for a batch with per-token targets (see the module docstring)."""
    if not isinstance(targets, torch.Tensor):
        return targets is None and not args  # a dict batch without labels
    if not args:  # a dict batch
        return targets.dim() >= 2
    tokens = args[0]
    return is_token_ids(tokens) and targets.shape == tokens.shape and not targets.is_floating_point()


def observed_labels(args: tuple, kwargs: dict, targets, labels) -> tuple[dict, torch.Tensor | None]:
    """``(kwargs for the model, labels for observe())`` of one batch under ``labels``."""
    if isinstance(labels, str):
        if args or labels not in kwargs:
            raise ValueError(f"collect(labels={labels!r}): each batch must be a dict with a {labels!r} entry "
                             f"(one label per sequence); got {'a tuple batch' if args else sorted(kwargs)}")
        kwargs = dict(kwargs)
        return kwargs, kwargs.pop(labels)
    if labels is False or targets is None:
        return kwargs, None
    language_model = is_language_model_batch(args, kwargs, targets)
    if labels is None:
        return kwargs, None if language_model else targets
    if labels is True:
        if language_model:
            raise ValueError(
                f"collect(labels=True): this batch's targets {tuple(targets.shape)} are per token (a language-model "
                "batch), not one label per sample; leave labels=None (one group), or name a dict batch's entry "
                "holding one label per sequence with labels='key'"
            )
        return kwargs, targets
    raise TypeError(f"collect(): labels must be None, True, False or a dict batch's key, got {labels!r}")
