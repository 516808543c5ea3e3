"""Training and evaluation loops shared by the demo, the methods and the tests."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.data import make_loader

Progress = Callable[[str], None]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    label: str = "train",
) -> nn.Module:
    """Adam with a cosine schedule over ``epochs``; the model is trained in place and returned."""
    torch.manual_seed(seed)
    loader = make_loader(x, y, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    device = model_device(model)
    model.train()
    for epoch in range(epochs):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            schedule.step()
        if progress is not None and (epoch + 1) % max(1, epochs // 5) == 0:
            progress(f"{label}: epoch {epoch + 1}/{epochs}")
    model.eval()
    return model


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


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if len(x) == 0:
        return float("nan")
    predictions = predict_logits(model, x).argmax(1)
    return 100.0 * (predictions == y.to(predictions.device)).float().mean().item()


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
