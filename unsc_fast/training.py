"""Running a model: the one training loop (``fit``) that UNSC, every method of the harness,
the demo and retraining use; batches from tensors; logits in eval mode; and train/eval flags
that are always restored."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

Progress = Callable[[str], None]
# loss(outputs, targets) -> scalar; objective(loss, fraction_of_training_done) -> what is minimised
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, float], torch.Tensor]


def make_loader(x, y, batch_size: int = 64, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over in-memory tensors; shuffling is seeded so runs repeat."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def to_device(batch, device: torch.device):
    """``batch`` (a tensor, or a tuple/list/dict of them, nested) with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_parts(batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """``(args, kwargs, targets)`` of one batch: ``(inputs, targets, ...)`` calls ``model(inputs)``;
    a bare tensor is inputs without targets; a dict is the model's keyword inputs, with its
    ``"labels"`` entry (if any) as the targets (the Hugging Face convention)."""
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}, (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    return (batch,), {}, None


def leading_size(args: tuple, kwargs: dict) -> int | None:
    """The leading size of a batch's first tensor input (positional, else ``input_ids`` /
    ``pixel_values`` / the first keyword tensor): its number of samples. None if it has none."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        named = [kwargs.get("input_ids"), kwargs.get("pixel_values"), *kwargs.values()]
        first = next((v for v in named if isinstance(v, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else None


def progress_bar(iterable, description: str, enabled: bool | None = None, **kwargs):
    """A tqdm bar over ``iterable``: ``enabled=None`` shows it only on a terminal and only once
    the pass has taken 2 s (so short passes and test runs print nothing); False never."""
    return tqdm(iterable, desc=description, disable=None if enabled is None else not enabled, delay=2,
                leave=False, **kwargs)


def causal_lm_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``targets[:, t + 1]``; ``-100`` is ignored.

    ``outputs`` are logits ``(B, T, V)`` or a model output with ``.logits`` (transformers)."""
    logits = logits_of(outputs)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1), ignore_index=-100
    )


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits on the model's device, in eval mode (the model's modes are restored afterwards).

    ``x`` may live anywhere: each chunk is moved to the model's device.
    """
    if len(x) == 0:
        return torch.empty(0)
    device = model_device(model)
    with eval_mode(model):
        return torch.cat([logits_of(model(x[i : i + batch_size].to(device))) for i in range(0, len(x), batch_size)])


def logits_of(outputs) -> torch.Tensor:
    """A model's logits: its output, or the output's ``.logits`` (Hugging Face models)."""
    return getattr(outputs, "logits", outputs)


@torch.no_grad()
def batch_logits(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Logits of one batch's inputs (``batch_parts``: positional and keyword, e.g. a Hugging Face
    dict's ``input_ids`` and ``attention_mask``), on the model's device, in eval mode."""
    device = model_device(model)
    with eval_mode(model):
        return logits_of(model(*to_device(tuple(args), device), **to_device(dict(kwargs), device)))


@contextlib.contextmanager
def _modes_restored(model: nn.Module):
    """Puts every module's train/eval flag back on exit, whatever the body set."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def train_mode(model: nn.Module):
    with _modes_restored(model):
        model.train()
        yield model


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    with _modes_restored(model):
        model.eval()
        yield model


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module):
    """Train mode with every BatchNorm in eval mode: running statistics stay as they are."""
    with _modes_restored(model):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        yield model


def _steps(batches, epochs: int) -> int | None:
    """Batches in the whole run, or None for an iterable that does not know its length."""
    try:
        return max(1, epochs * len(batches))
    except TypeError:
        return None


def fit(
    model: nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    loss: Loss = F.cross_entropy,
    objective: Objective | None = None,
    scheduler=None,
    after_backward: Callable[[], None] | None = None,
    freeze_batchnorm: bool = False,
    progress: Progress | None = None,
    label: str = "train",
    report_every: int = 1,
    progress_bar_enabled: bool | None = None,
) -> list[float]:
    """Train ``model`` in place over ``batches`` (re-iterated each epoch; ``(inputs, targets)``
    pairs, moved to the model's device) and return the mean loss of each epoch.

    ``objective`` turns the batch loss into what is minimised (gradient ascent negates it,
    l1-sparse adds a penalty that depends on the fraction of training done);
    ``after_backward`` edits gradients before the step (SalUn's mask); ``scheduler`` steps
    once per batch. ``freeze_batchnorm`` keeps BatchNorm running statistics as they are
    (UNSC: the remaining data's statistics must not move). The model's train/eval flags are
    restored afterwards. ``progress`` hears every ``report_every`` epochs. Batches may
    also be dicts of keyword inputs (see ``batch_parts``). A tqdm bar counts the epochs on a
    terminal once they take 2 s (``progress_bar_enabled=False``: never; True: always).
    """
    device = model_device(model)
    total_steps = _steps(batches, epochs)
    losses, step = [], 0
    with frozen_batchnorm(model) if freeze_batchnorm else train_mode(model):
        for epoch in progress_bar(range(epochs), label, progress_bar_enabled):
            total, count = 0.0, 0
            for batch in batches:
                args, kwargs, targets = batch_parts(to_device(batch, device))
                optimizer.zero_grad(set_to_none=True)
                value = loss(model(*args, **kwargs), targets)
                minimised = value if objective is None else objective(value, step / total_steps if total_steps else 0.0)
                minimised.backward()
                if after_backward is not None:
                    after_backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                size = len(targets) if targets is not None else len((args or tuple(kwargs.values()))[0])
                total += value.item() * size
                count += size
            losses.append(total / max(count, 1))
            if progress is not None and ((epoch + 1) % report_every == 0 or epoch + 1 == epochs):
                progress(f"{label}: epoch {epoch + 1}/{epochs}, loss {losses[-1]:.4f}")
    return losses
