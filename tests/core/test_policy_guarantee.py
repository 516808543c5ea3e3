"""The guarantee under every statistics policy (issue 22.5): a wrapped AdamW's weight change stays
in the null space (``||dW U|| / ||dW||`` at float32 rounding), and on the remaining inputs
``tr(dW C_r dW^T) <= ||dW||_2^2 (1 - threshold) tr(C_r)``: the basis keeps at least the
threshold of the remaining energy, exactly from dense statistics and by the sketch's energy
guarantee (``B^T B <= C``) from a sketch."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector

ROUNDING = 1e-5  # float32: the residual of an exact step is ~1e-7, of a missed projection ~1e-1
THRESHOLD = 0.9


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 3, 8, 8, generator=g) * torch.tensor([1.0, 0.3, 0.05])[:, None, None]
    return model, x, torch.arange(160) % 4


def folding_budget(model):
    probe = NullSpaceProjector(model)
    return probe._costs().per_label(2, 4) + 1  # two labels per label, then one total


POLICIES = {
    "per_label": lambda model: dict(statistics="per_label"),
    "total_fp64": lambda model: dict(statistics="total"),
    "total_fp32": lambda model: dict(statistics="total", dtype=torch.float32),
    "auto_folded": lambda model: dict(memory_budget=folding_budget(model)),
    "sketched": lambda model: dict(sketch={"0": 12, "3": 24}),
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_change_stays_in_the_null_space_under_every_policy(policy):
    model, x, y = model_and_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fold's warning is tested elsewhere
        proj = NullSpaceProjector(model, threshold=THRESHOLD, **POLICIES[policy](model))
        proj.collect([(x[y == c], y[y == c]) for c in range(4)])
    assert (proj.statistics == "total") == (policy in ("total_fp64", "total_fp32", "auto_folded"))
    if proj.statistics == "total":
        proj.collect([(x[y == 1], y[y == 1])], forget=True)
    proj.build(exclude=(1,))
    exact = NullSpaceProjector(model, statistics="per_label", dtype=torch.float64)
    exact.collect([(x[y == c], y[y == c]) for c in (0, 2, 3)])

    start = {name: layer.weight.detach().clone() for name, layer in proj.layers.items()}
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), proj)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x[y == 1]), torch.randint(0, 4, (40,), generator=g)).backward()
        optimizer.step()
    for name, layer in proj.layers.items():
        change = layer.weight.detach() - start[name]
        assert change.norm() > 1e-3 * start[name].norm(), name  # it did move
        assert proj.residual(layer.weight, change) < ROUNDING, (policy, name)
        matrix = change.double().flatten(1)
        remaining = exact.store.kept_sum(name, [0, 2, 3])
        basis = proj.basis(name).double()  # the worst case of the bound below: its energy kept
        assert torch.trace(basis.T @ remaining @ basis) >= (THRESHOLD - 1e-6) * remaining.trace(), (policy, name)
        moved = torch.trace(matrix @ remaining @ matrix.T).item()
        bound = torch.linalg.matrix_norm(matrix, 2).item() ** 2 * (1 - THRESHOLD) * remaining.trace().item()
        assert moved <= bound * (1 + 1e-6), (policy, name, moved / bound)
