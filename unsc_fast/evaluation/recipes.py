"""The harness's standard recipe for training an original (or retrained) model."""
from __future__ import annotations

import torch
from torch import nn

from unsc_fast.training import Progress, fit, make_loader


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
    """AdamW with a cosine schedule over ``epochs``; the model is trained in place, left in
    eval mode and returned."""
    torch.manual_seed(seed)
    loader = make_loader(x, y, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    fit(model, loader, optimizer, epochs=epochs, scheduler=schedule, progress=progress, label=label,
        report_every=max(1, epochs // 5))
    return model.eval()
