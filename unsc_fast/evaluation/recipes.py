"""The harness's standard recipe for training an original (or retrained) model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.training import Progress, make_loader, model_device


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
