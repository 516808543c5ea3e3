"""A small MLP trained on four well separated classes: the forget class has room to leave, so a
run's stop reason and measures are quick to check (the stop rule's and the loaders' tests)."""
import torch
from torch import nn


def separable_mlp(seed: int = 0):
    """``(model, x, y)``: 160 samples of 4 classes, one-hot offsets of 4 in 6 dimensions."""
    torch.manual_seed(seed)
    y = torch.arange(160) % 4
    x = torch.randn(160, 6) + 4.0 * nn.functional.one_hot(y, 6).float()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y
