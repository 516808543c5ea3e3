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

Progress = Callable[[str], None]
# loss(outputs, targets) -> scalar; objective(loss, fraction_of_training_done) -> what is minimised
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, float], torch.Tensor]


def make_loader(x, y, batch_size: int = 64, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over in-memory tensors; shuffling is seeded so runs repeat."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


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
        return torch.cat([model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


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
) -> list[float]:
    """Train ``model`` in place over ``batches`` (re-iterated each epoch; ``(inputs, targets)``
    pairs, moved to the model's device) and return the mean loss of each epoch.

    ``objective`` turns the batch loss into what is minimised (gradient ascent negates it,
    l1-sparse adds a penalty that depends on the fraction of training done);
    ``after_backward`` edits gradients before the step (SalUn's mask); ``scheduler`` steps
    once per batch. ``freeze_batchnorm`` keeps BatchNorm running statistics as they are
    (UNSC: the remaining data's statistics must not move). The model's train/eval flags are
    restored afterwards. ``progress`` hears every ``report_every`` epochs.
    """
    device = model_device(model)
    total_steps = max(1, epochs * len(batches)) if hasattr(batches, "__len__") else None
    losses, step = [], 0
    with frozen_batchnorm(model) if freeze_batchnorm else train_mode(model):
        for epoch in range(epochs):
            total, count = 0.0, 0
            for inputs, targets in batches:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                value = loss(model(inputs), targets)
                minimised = value if objective is None else objective(value, step / total_steps if total_steps else 0.0)
                minimised.backward()
                if after_backward is not None:
                    after_backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                total += value.item() * len(inputs)
                count += len(inputs)
            losses.append(total / max(count, 1))
            if progress is not None and ((epoch + 1) % report_every == 0 or epoch + 1 == epochs):
                progress(f"{label}: epoch {epoch + 1}/{epochs}, loss {losses[-1]:.4f}")
    return losses
