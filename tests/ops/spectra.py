"""Covariances with a known spectrum, shared by the energy-basis tests."""
from __future__ import annotations

import torch


def with_spectrum(eigenvalues, dtype=torch.float64, seed=0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal Q."""
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    d = eigenvalues.numel()
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    C = (Q * eigenvalues) @ Q.mT
    return ((C + C.mT) / 2).to(dtype)


def spectrum(kind: str, d: int) -> torch.Tensor:
    index = torch.arange(d, dtype=torch.float64)
    if kind == "exp":
        return torch.exp(-index / (d / 10))
    if kind == "power":
        return (1 + index) ** -1.5
    if kind == "flat":
        return (1 + index) ** -0.5
    if kind == "rank5":
        return (index < 5).double() * (5 - index)
    raise ValueError(kind)


def uncentred_features(d: int, rows: int, seed: int = 0) -> torch.Tensor:
    """fp32 ``X^T X`` of ReLU features (a conv layer's inputs in miniature): the mean direction
    holds most of the energy, the rest decays slowly, so the 0.99 energy rank is most of d
    while ``trace^2 / ||C||_F^2`` (the plain effective rank) is a few columns."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5
    X = torch.relu(torch.randn(rows, d, generator=generator, dtype=torch.float64) @ mixing)
    return (X.mT @ X).float()
