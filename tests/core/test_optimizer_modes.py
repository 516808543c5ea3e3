"""NullSpaceOptimizer's project_gradients modes: which tensors each step projects, and that the
one projection of "auto" keeps every change in the null space over many float32 steps."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector

STEPS = 150
ROUNDING = 1e-5  # float32: the residual of an exact step is ~1e-7, of a missed projection ~1e-1


def model_and_projector(threshold=0.9):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 4))
    projector = NullSpaceProjector(model, threshold=threshold)
    with torch.no_grad(), projector.observe():
        model(torch.randn(32, 3, 8, 8))
    return model, projector.build()


def step_on_random_batch(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 8, 8, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def weights(projector):
    return {name: layer.weight.detach().clone() for name, layer in projector.layers.items()}


def worst_residual(projector, start):
    """max over layers of ||dW U|| / ||dW|| for the change since ``start``."""
    worst = 0.0
    for name, layer in projector.layers.items():
        change = layer.weight.detach() - start[name]
        assert change.norm() > 1e-3 * start[name].norm(), name  # it did learn
        worst = max(worst, projector.residual(layer.weight, change))
    return worst


@pytest.fixture
def calls(monkeypatch):
    """Every projection as (layer, what): "gradient", "change" (the weight's own storage) or
    "other" (a momentum buffer)."""
    record = []
    project = NullSpaceProjector.project_parameter_

    def counting(self, param, tensor):
        weight = self._parameter(param) if isinstance(param, str) else param
        what = ("gradient" if weight.grad is not None and tensor.data_ptr() == weight.grad.data_ptr()
                else "change" if tensor.data_ptr() == weight.data_ptr() else "other")
        record.append((param.removesuffix(".weight"), what))
        return project(self, param, tensor)

    monkeypatch.setattr(NullSpaceProjector, "project_parameter_", counting)
    return record


def per_step(calls, layers):
    """The kinds projected per layer, each layer's list in call order."""
    return {name: [what for layer, what in calls if layer == name] for name in layers}


SGD_LINEAR = {  # the residual is relative to the change: each learns ~1/3 of its weights' norm
    "momentum": dict(lr=0.02, momentum=0.9),
    "nesterov": dict(lr=0.02, momentum=0.9, nesterov=True),
    "dampening_maximize": dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
}


@pytest.mark.parametrize("config", sorted(SGD_LINEAR))
def test_auto_projects_only_sgds_gradients_and_stays_exact(config, calls):
    model, projector = model_and_projector()
    start = weights(projector)
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), **SGD_LINEAR[config]), projector)
    for step in range(STEPS):
        step_on_random_batch(model, optimizer, step)
    assert per_step(calls, projector.layers) == {name: ["gradient"] * STEPS for name in projector.layers}
    assert worst_residual(projector, start) < ROUNDING


INNER_NOT_LINEAR = {
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.005, weight_decay=0.5),
    "sgd_subclass": lambda p: type("MySGD", (torch.optim.SGD,), {})(p, lr=0.02, momentum=0.9),
}


@pytest.mark.parametrize("inner", sorted(INNER_NOT_LINEAR))
def test_auto_projects_only_the_change_elsewhere_and_stays_exact(inner, calls):
    model, projector = model_and_projector()
    start = weights(projector)
    optimizer = NullSpaceOptimizer(INNER_NOT_LINEAR[inner](model.parameters()), projector)
    for step in range(STEPS):
        step_on_random_batch(model, optimizer, step)
    assert per_step(calls, projector.layers) == {name: ["change"] * STEPS for name in projector.layers}
    assert worst_residual(projector, start) < ROUNDING


@pytest.mark.parametrize("mode, kinds", [(True, ["gradient", "change"]), (False, ["change"])])
def test_true_projects_gradient_and_change_false_the_change(mode, kinds, calls):
    model, projector = model_and_projector()
    start = weights(projector)
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), projector,
                                   project_gradients=mode)
    for step in range(3):
        step_on_random_batch(model, optimizer, step)
    assert per_step(calls, projector.layers) == {name: kinds * 3 for name in projector.layers}
    assert worst_residual(projector, start) < ROUNDING


def test_weight_decay_switched_between_steps_keeps_sgd_exact(calls):
    """Decided per group at each step: weight decay puts W into the momentum buffer, so the
    steps with it project the change, and the first step without it projects the buffer once."""
    model, projector = model_and_projector()
    start = weights(projector)
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), projector)
    schedule = [0.0] * 5 + [0.5] * 5 + [0.0] * 40
    for step, decay in enumerate(schedule):
        optimizer.param_groups[0]["weight_decay"] = decay
        step_on_random_batch(model, optimizer, step)
    expected = ["gradient"] * 5 + ["change"] * 5 + ["gradient", "other"] + ["gradient"] * 39
    assert per_step(calls, projector.layers) == {name: expected for name in projector.layers}
    assert worst_residual(projector, start) < ROUNDING


def test_a_new_build_or_a_loaded_state_projects_the_momentum_buffer_once(calls):
    """After a refit the momentum buffer holds the old null space's vectors; after loading a
    plain SGD's state, unprojected gradients. Each is projected once, then gradients suffice."""
    model, projector = model_and_projector()
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), projector)
    for step in range(5):
        step_on_random_batch(model, optimizer, step)
    projector.build(threshold=0.95)
    start = weights(projector)
    calls.clear()
    for step in range(5, 45):
        step_on_random_batch(model, optimizer, step)
    expected = ["gradient", "other"] + ["gradient"] * 39
    assert per_step(calls, projector.layers) == {name: expected for name in projector.layers}
    assert worst_residual(projector, start) < ROUNDING

    plain = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for step in range(45, 50):
        step_on_random_batch(model, plain, step)
    optimizer.load_state_dict(plain.state_dict())
    start = weights(projector)
    calls.clear()
    for step in range(50, 90):
        step_on_random_batch(model, optimizer, step)
    assert per_step(calls, projector.layers) == {name: expected for name in projector.layers}
    assert worst_residual(projector, start) < ROUNDING


def test_auto_round_trips_and_old_bool_states_load():
    model, projector = model_and_projector()
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), projector)
    step_on_random_batch(model, optimizer, 0)
    state = optimizer.state_dict()
    clean = {"layers": ["0.weight", "3.weight", "5.weight"], "bases": projector.solution.fingerprint()}
    assert state["null_space"] == {"untracked": "freeze", "project_gradients": "auto", "clean_momentum": clean}
    target = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), projector,
                                project_gradients=False)
    target.load_state_dict(copy.deepcopy(state))
    assert target.project_gradients == "auto"
    state["null_space"] = {"untracked": "freeze", "project_gradients": True}  # as saved before "auto" existed
    target.load_state_dict(state)
    assert target.project_gradients is True
    twin = pickle.loads(pickle.dumps(optimizer))  # the marks of live objects travel as plain values
    assert twin.project_gradients == "auto" and twin._clean_buffers == {} and twin._loaded_clean == clean
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), projector, project_gradients="yes")
