"""What the core needs to run a model: batches from tensors, the model's device, logits in
 eval mode, and train/eval flags that are always restored."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.data import DataLoader, TensorDataset

Progress = Callable[[str], None]


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
