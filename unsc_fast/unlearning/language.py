"""A language model's data in ``unlearn()``: what counts as one, how it is batched and sliced,
and what the stop rule measures on it.

Language-model data is token sequences with one target per token. ``unlearn()`` takes it as

* ``(tokens, labels)``: integer tensors of one shape (B, T) (labels ``-100`` where nothing is
  scored), batched as ``(tokens, labels)`` tuples (``model(tokens)``);
* ``tokens``: an integer (B, T) tensor alone (every token is scored);
* a dict of tensors, Hugging Face style: ``input_ids`` (B, T), optionally ``attention_mask``
  and ``labels`` (per token), batched as dicts (``model(input_ids=..., attention_mask=...)``);
* any iterable of such batches (a ``DataLoader``); in-memory forms can be sliced (the guard).

It is recognised from the data (``is_language_data``: the same rule as ``collect()``'s,
``unsc_fast.statistics.batches``), read from a ``DataLoader``'s dataset without drawing from
its sampler (so a shuffling loader's order is not disturbed), or from an LM objective.

The stop rule's unit is a scored token: ``correct_tokens`` says, per token whose label is not
``-100``, whether the model's most likely next token is the label. On the forget data it leaves
out the model's special tokens (``special_token_ids``: a Hugging Face config's end-of-sequence,
padding and start tokens): predicting the end of an answer after its (teacher-forced) value is
not knowledge of the value, and a forget score that counted it could only reach the target by
breaking how the model ends every answer (docs/language_models.md).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from unsc_fast.objectives.causal_lm import token_labels
from unsc_fast.objectives.language import IGNORE_INDEX
from unsc_fast.statistics.batches import is_language_model_batch, is_token_ids
from unsc_fast.training import batch_parts, eval_mode, logits_of, model_device, to_device


def _is_token_dict(data) -> bool:
    return isinstance(data, Mapping) and is_token_ids(data.get("input_ids"))


def in_memory(data) -> bool:
    """Language-model data held as tensors (sliceable): a token tensor, a pair, a token dict."""
    if is_token_ids(data) or _is_token_dict(data):
        return True
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
        and is_language_model_batch((data[0],), {}, data[1])


def _batch_is_language(batch) -> bool | None:
    if isinstance(batch, torch.Tensor):
        return is_token_ids(batch)
    if isinstance(batch, (tuple, list, Mapping)):
        args, kwargs, targets = batch_parts(batch)
        if isinstance(batch, Mapping) and "input_ids" not in batch:
            return None
        return is_language_model_batch(args, kwargs, targets)
    return None


def _sample_is_language(sample) -> bool | None:
    """A map-style dataset's first sample, seen as a batch of one."""
    if isinstance(sample, torch.Tensor):
        return _batch_is_language(sample.unsqueeze(0))
    if isinstance(sample, (tuple, list)) and sample and all(isinstance(t, torch.Tensor) for t in sample[:2]):
        return _batch_is_language(tuple(t.unsqueeze(0) for t in sample[:2]))
    if isinstance(sample, Mapping):
        return _batch_is_language({k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in sample.items()})
    return None


def is_language_data(data) -> bool | None:
    """True for language-model data, False for a classifier's, None when it cannot be told
    without consuming it (an iterable-style dataset, a generator)."""
    if data is None:
        return None
    if in_memory(data):
        return True
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return False  # a classifier's (x, y)
    if isinstance(data, DataLoader):
        dataset = data.dataset
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset) > 0:
            try:
                return _sample_is_language(dataset[0])
            except (TypeError, KeyError, IndexError, NotImplementedError):
                return None
        return None
    if isinstance(data, (list, tuple)) and data:
        return _batch_is_language(data[0])
    return None


def normalised(data):
    """In-memory data as a ``(tokens, labels)`` pair or a token dict (tokens alone: labels = tokens)."""
    if is_token_ids(data):
        return data, data
    if _is_token_dict(data):
        length = data["input_ids"].shape[0]
        for key, value in data.items():
            if isinstance(value, torch.Tensor) and value.shape[:1] != (length,):
                raise ValueError(f"language-model data: {key!r} has {tuple(value.shape)[:1] or 'no'} rows, "
                                 f"input_ids has {length}")
        return dict(data)
    return data


def size(data) -> int:
    return int(data["input_ids"].shape[0]) if isinstance(data, Mapping) else int(data[0].shape[0])


def take(data, index: torch.Tensor):
    """The sequences ``index`` of normalised in-memory data."""
    if isinstance(data, Mapping):
        return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    return data[0][index], data[1][index]


def split_off(data, share: float, generator: torch.Generator):
    """``(held, rest)``: a seeded random ``share`` of the sequences (at least one, never all)."""
    count = size(data)
    held = min(max(int(round(share * count)), 1), count - 1) if share > 0 and count >= 2 else 0
    order = torch.randperm(count, generator=generator)
    if held == 0:
        return None, data
    return take(data, order[:held].sort().values), take(data, order[held:].sort().values)


class TokenBatches:
    """Re-iterable batches of normalised in-memory data (a new seeded order every pass when
    ``shuffle``); dict batches are trimmed to their longest real sequence."""

    def __init__(self, data, batch_size: int, shuffle: bool = False, seed: int = 0) -> None:
        self.data, self.batch_size, self.shuffle = data, int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-size(self.data) // self.batch_size)

    def __iter__(self):
        count = size(self.data)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else torch.arange(count)
        for index in order.split(self.batch_size):
            part = take(self.data, index)
            if isinstance(part, Mapping) and isinstance(part.get("attention_mask"), torch.Tensor):
                real = part["attention_mask"].ne(0).any(0).nonzero()
                length = int(real.max()) + 1 if real.numel() else 0
                part = {k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                        for k, v in part.items()}
            yield part


def batches(data, batch_size: int, shuffle: bool = False, seed: int = 0):
    """Batches of any language-model data: in-memory data batched, an iterable used as it is."""
    return TokenBatches(normalised(data), batch_size, shuffle, seed) if in_memory(data) else data


def special_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The end-of-sequence, padding and start token ids of a model's Hugging Face ``config``
    (each may be unset, one id or a list); none for a model without one."""
    config = getattr(model, "config", None)
    ids = set()
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and not isinstance(token, bool):
                ids.add(token)
    return tuple(sorted(ids))


@torch.no_grad()
def correct_tokens(model: nn.Module, data, batch_size: int = 256, skip: tuple[int, ...] = ()) -> torch.Tensor:
    """Per scored token (label not ``-100`` nor in ``skip``), in order: is the model's most likely
    next token the label? ``data``: any language-model data (a loader must give its batches in the
    same order every pass for the guard's comparison). Eval mode, restored afterwards."""
    device = model_device(model)
    flags = []
    with eval_mode(model):
        for batch in batches(data, batch_size):
            args, kwargs, targets = batch_parts(to_device(batch, device))
            labels = token_labels(args, kwargs, targets)
            if labels is None or labels.dim() != 2:
                raise ValueError("the language-model stop rule needs per-token labels or (batch, seq) integer "
                                 f"tokens; got a batch with targets {None if targets is None else tuple(targets.shape)}")
            outputs = model(*args, **kwargs)
            logits = logits_of(outputs)
            scored = labels[:, 1:] != IGNORE_INDEX
            if skip:
                scored &= ~torch.isin(labels[:, 1:], torch.tensor(skip, device=labels.device))
            flags.append((logits[:, :-1].argmax(-1) == labels[:, 1:])[scored].cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)
