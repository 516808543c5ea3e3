"""Mixed precision: observing under bf16 autocast accumulates the bf16 activations in fp32/fp64
exactly enough, and the wrapper keeps bf16 parameters' changes in the null space."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))


def recorded_inputs(model, x):
    """What each Linear actually received (its dtype included) in one autocast forward."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(a[0])))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(parts) for n, parts in seen.items()}


@pytest.mark.parametrize("statistics, unit", [("per_label", 2.0**-24), ("total", 2.0**-53)])
def test_autocast_bf16_observation_accumulates_the_rounded_inputs_in_full_precision(statistics, unit):
    model = mlp()
    x = torch.randn(300, 16)
    proj = NullSpaceProjector(model, statistics=statistics)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk in x.split(100):
            with proj.observe():
                model(chunk)
    inputs = recorded_inputs(model, x)
    assert inputs["2"].dtype == torch.bfloat16  # the layers behind the first see bf16 activations
    for name, rows in inputs.items():
        C = proj.covariance(name).double()
        exact = rows.double().T @ rows.double()  # fp64 covariance of the bf16-rounded inputs: exact here
        # Bound: any summation order of n products in precision u errs by at most
        # gamma_n |x|^T |x| elementwise, gamma_n = n u / (1 - n u) (Higham, Thm 3.5).
        n = rows.shape[0]
        gamma = n * unit / (1 - n * unit)
        bound = gamma * (rows.double().abs().T @ rows.double().abs())
        assert ((C - exact).abs() <= bound + 1e-300).all(), name
        assert proj.covariance(name).dtype == proj.dtype != torch.bfloat16


def test_bf16_parameters_step_and_their_change_stays_in_the_null_space():
    model = mlp().to(torch.bfloat16)
    x = torch.randn(400, 16)
    y = torch.randint(0, 5, (400,))
    proj = NullSpaceProjector(model, threshold=0.9)
    proj.collect([(x[i : i + 100].bfloat16(), y[i : i + 100]) for i in range(0, 400, 100)])
    proj.build(exclude=(0,))
    assert proj.dtype == torch.float32
    before = {n: l.weight.detach().clone() for n, l in proj.layers.items()}
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), proj)
    steps = 3
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[y == 0].bfloat16()).float(), (y[y == 0] + 1) % 5).backward()
        opt.step()
    for name, layer in proj.layers.items():
        weight = layer.weight.detach()
        assert weight.dtype == torch.bfloat16
        change = (weight.double() - before[name].double()).reshape(weight.shape[0], -1)
        U = proj.basis(name).double()
        assert change.norm() > 1e-3, name
        # each step rounds W + dW to bf16 (u = 2^-8, at most u |w| per element); U U^T is a
        # projection, so the leak is at most steps * u ||W|| (bound used: 2 * steps * u ||W||)
        assert (change @ U).norm() <= 2 * steps * 2.0**-8 * weight.double().norm(), name
        # and far below what an unprojected change leaks into the kept subspace
        assert (change @ U).norm() < 0.2 * change.norm(), name
