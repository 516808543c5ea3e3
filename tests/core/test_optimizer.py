"""NullSpaceOptimizer: exact null-space updates for any inner optimizer, and optimizer behaviour."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector

from state_helpers import assert_bitwise_equal  # noqa: E402


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    ).double()


def built_projector(model, threshold=0.9, seed=0):
    torch.manual_seed(seed)
    projector = NullSpaceProjector(model, threshold=threshold, dtype=torch.float64)
    model.eval()
    with torch.no_grad(), projector.observe():
        model(torch.randn(16, 3, 6, 6, dtype=torch.float64))
    model.train()
    return projector.build()


def loss_on_random_batch(model, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    return F.cross_entropy(model(x), y)


INNER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
}


@pytest.mark.parametrize("inner", sorted(INNER))
def test_parameter_change_lies_in_the_null_space(inner):
    torch.manual_seed(0)
    model = small_model()
    projector = built_projector(model)
    optimizer = NullSpaceOptimizer(INNER[inner](model.parameters()), projector)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(4):
        optimizer.zero_grad()
        loss_on_random_batch(model, step).backward()
        optimizer.step()
    for name, layer in projector.layers.items():
        change = (layer.weight.detach() - start[f"{name}.weight"]).reshape(layer.weight.shape[0], -1)
        U = projector.basis(name)
        assert change.norm() > 1e-4, name  # it did learn
        assert (change @ U).norm() <= 1e-10 * change.norm() + 1e-13, name
    for name, parameter in model.named_parameters():
        if not name.endswith("weight") or name.startswith("1."):  # biases and BatchNorm: frozen
            assert torch.equal(parameter, start[name]), name


def test_remaining_outputs_unchanged_under_adamw():
    """Theorem 1 in practice: with threshold 1 the remaining data's logits do not move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    remaining = torch.randn(8, 20, dtype=torch.float64)
    projector = NullSpaceProjector(model, threshold=1.0, dtype=torch.float64)
    with projector.observe():
        model(remaining)
    projector.build()
    before = model(remaining).detach()
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1), projector)
    forget = torch.randn(4, 20, dtype=torch.float64)
    for _ in range(5):
        optimizer.zero_grad()
        model(forget).square().sum().backward()
        optimizer.step()
    assert (model(forget).detach() - model(forget).detach()).abs().max() == 0
    torch.testing.assert_close(model(remaining).detach(), before, atol=1e-9, rtol=0)


def test_plain_sgd_equals_projected_gradient_step():
    torch.manual_seed(0)
    model = small_model()
    projector = built_projector(model)
    reference = copy.deepcopy(model)
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), projector)
    loss_on_random_batch(model, 0).backward()
    optimizer.step()
    loss_on_random_batch(reference, 0).backward()
    with torch.no_grad():
        for name, layer in projector.layers.items():
            weight = reference.get_submodule(name).weight
            grad = weight.grad.reshape(len(weight), -1)
            U = projector.basis(name)
            weight -= 0.1 * (grad - grad @ U @ U.T).reshape(weight.shape)
            torch.testing.assert_close(layer.weight, weight, atol=1e-14, rtol=0)


def identity_setup():
    """A model whose observed inputs are all zero: empty bases, so projection is the identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.zero_()
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(torch.zeros(4, 5))
    projector.build()
    for layer in (model[0], model[2]):
        nn.init.uniform_(layer.bias)
    assert all(k == 0 for k in projector.ranks().values())
    return model, projector


@pytest.mark.parametrize("implementation", ["foreach", "forloop"])
def test_identity_projector_is_bitwise_the_inner_optimizer(implementation):
    """Seven Adam steps, one with no gradients and a layer frozen in steps 3-5 (PyTorch's parity test)."""
    model, projector = identity_setup()
    twin = copy.deepcopy(model)
    foreach = implementation == "foreach"
    wrapped = NullSpaceOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, foreach=foreach), projector, untracked="train")
    plain = torch.optim.Adam(twin.parameters(), lr=0.01, foreach=foreach)
    for step in range(7):
        for net, optimizer in ((model, wrapped), (twin, plain)):
            optimizer.zero_grad()
            net[2].weight.requires_grad_(not 3 <= step <= 5)
            if step != 1:
                torch.manual_seed(step)
                net(torch.randn(3, 5)).sum().backward()
            optimizer.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(wrapped.state_dict()["state"][0]["exp_avg"], plain.state_dict()["state"][0]["exp_avg"])


def test_param_groups_alias_the_inner_optimizer_and_schedulers_work():
    model = small_model()
    projector = built_projector(model)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    optimizer = NullSpaceOptimizer(inner, projector)
    assert optimizer.param_groups is inner.param_groups and optimizer.state is inner.state
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loss_on_random_batch(model, 0).backward()
    optimizer.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.5
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.param_groups is inner.param_groups  # still the live list after loading
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.25


def run_steps(model, optimizer, steps, offset):
    for step in range(steps):
        optimizer.zero_grad()
        loss_on_random_batch(model, offset + step).backward()
        optimizer.step()


def test_resume_from_state_dict_continues_exactly(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    projector = built_projector(model)
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), projector)
    run_steps(model, optimizer, 5, 0)
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "proj": projector.state_dict()},
               tmp_path / "checkpoint.pt")
    saved = copy.deepcopy(optimizer.state_dict())

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_model = small_model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_projector = NullSpaceProjector(resumed_model, dtype=torch.float64).load_state_dict(checkpoint["proj"])
    resumed = NullSpaceOptimizer(torch.optim.AdamW(resumed_model.parameters(), lr=0.01), resumed_projector)
    resumed.load_state_dict(checkpoint["optim"])
    assert str(optimizer.state_dict()) == str(saved)  # saving did not mutate anything

    run_steps(model, optimizer, 5, 100)
    run_steps(resumed_model, resumed, 5, 100)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_closure_is_called_once_and_its_gradients_are_projected():
    model = small_model()
    projector = built_projector(model)
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), projector)
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = loss_on_random_batch(model, 0)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor)
    for name, layer in projector.layers.items():
        grad = layer.weight.grad.reshape(len(layer.weight), -1)
        assert (grad @ projector.basis(name)).abs().max() < 1e-10


def test_untracked_policy_and_per_group_opt_out():
    model = small_model()
    projector = built_projector(model)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    optimizer = NullSpaceOptimizer(torch.optim.SGD(weights, lr=0.1), projector, untracked="train")
    optimizer.add_param_group({"params": biases, "lr": 0.1, "project": False})
    before = [b.detach().clone() for b in biases]
    loss_on_random_batch(model, 0).backward()
    optimizer.step()
    moved = [not torch.equal(b, old) for b, old in zip(biases, before)]
    assert moved[-2:] == [True, True]  # the Linear biases (the conv bias feeds a BatchNorm: zero grad)
    assert all(b.grad is not None for b in biases)  # grads are restored after the step
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": biases[:1]})


def test_frozen_untracked_keep_their_gradients():
    model = small_model()
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), built_projector(model))
    loss_on_random_batch(model, 0).backward()
    bias = model[4].bias
    grad = bias.grad.clone()
    before = bias.detach().clone()
    optimizer.step()
    assert torch.equal(bias, before) and torch.equal(bias.grad, grad)


def test_zero_grad_set_to_none_and_zero_gradients_are_a_no_op():
    model = small_model()
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), built_projector(model))
    loss_on_random_batch(model, 0).backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_construction_errors():
    model = small_model()
    projector = built_projector(model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        NullSpaceOptimizer(model.parameters(), projector)
    with pytest.raises(ValueError, match="LBFGS"):
        NullSpaceOptimizer(torch.optim.LBFGS(model.parameters()), projector)
    with pytest.raises(ValueError, match="untracked"):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=1), projector, untracked="thaw")
    with pytest.raises(TypeError, match="NullSpaceProjector"):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=1), object())
    wrapped = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=1), projector)
    with pytest.raises(TypeError, match="already"):
        NullSpaceOptimizer(wrapped, projector)


def test_step_before_build_is_an_error():
    model = small_model()
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), NullSpaceProjector(model))
    loss_on_random_batch(model, 0).backward()
    with pytest.raises(RuntimeError, match="build"):
        optimizer.step()


def test_step_hooks_fire_in_order_and_repr_and_deepcopy():
    model = small_model()
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), built_projector(model))
    order = []
    optimizer.register_step_pre_hook(lambda *_: order.append("pre"))
    optimizer.register_step_post_hook(lambda *_: order.append("post"))
    loss_on_random_batch(model, 0).backward()
    optimizer.step()
    assert order == ["pre", "post"]
    assert "NullSpaceOptimizer" in repr(optimizer) and "SGD" in repr(optimizer)
    twin = copy.deepcopy(optimizer)
    assert twin.untracked == optimizer.untracked and twin.project_gradients
    assert len(twin.param_groups[0]["params"]) == len(optimizer.param_groups[0]["params"])


def test_grad_scaler_skips_the_step_on_inf():  # RELIABILITY 34
    """An inf gradient: GradScaler skips the step, and params, Adam's state and the
    projector all stay exactly as they were; the next finite step goes through."""
    model = small_model().float()
    projector = NullSpaceProjector(model, threshold=0.9)
    with projector.observe():
        model(torch.randn(4, 3, 6, 6))
    optimizer = NullSpaceOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), projector.build())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(torch.randn(4, 3, 6, 6)).sum()).backward()
    scaler.step(optimizer)  # a finite step first, so Adam has state to lose
    scaler.update()
    optimizer.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    projector_state = copy.deepcopy(projector.state_dict())
    scaler.scale(model(torch.randn(4, 3, 6, 6)).sum()).backward()
    model[4].weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
    assert state["state"]  # Adam has moments to keep
    assert_bitwise_equal(optimizer.state_dict(), state)
    assert_bitwise_equal(projector.state_dict(), projector_state)
    assert scaler.get_scale() < 2.0**10
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(4, 3, 6, 6)).sum()).backward()
    scaler.step(optimizer)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), params))


@pytest.mark.parametrize("backend, weight_decay", [("eager", 0.01), ("aot_eager", 0.01), ("eager", 0.0)])
def test_compiled_step_matches_eager_and_follows_a_refit(backend, weight_decay):  # RELIABILITY 33
    """``torch.compile(optimizer.step)`` equals eager over steps and two refits. The basis is
    read as a tensor at every call, never baked into the graph; the first refit (new rank)
    recompiles each layer's projection once, with k dynamic from then on, and the second
    recompiles nothing. With weight decay the change is projected; without it the gradients
    alone, and the momentum buffer once after each refit. (``fullgraph=True`` is out of reach: torch's own optimizers break the
    graph in ``step``, pytorch#104053. SGD, because compiled and eager AdamW differ by ~1e-6
    even without the wrapper: compiled Adam computes its bias correction from a float32 step
    tensor.)"""
    compiles = []

    def counting(graph_module, example_inputs):
        compiles.append(1)
        return torch._dynamo.lookup_backend(backend)(graph_module, example_inputs)

    def run(compiled: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = small_model()
        projector = NullSpaceProjector(model, threshold=0.9, dtype=torch.float64)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad(), projector.observe(labels=torch.arange(16) % 2):
            model(torch.randn(16, 3, 6, 6, generator=generator, dtype=torch.float64))
        optimizer = NullSpaceOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay), projector.build()
        )
        step = torch.compile(optimizer.step, backend=counting) if compiled else optimizer.step
        counts, ranks = [], []
        for index in range(6):
            if index == 2:
                projector.build(exclude=[1])
            if index == 4:
                projector.build(threshold=0.8)
            ranks.append(tuple(projector.basis(name).shape[1] for name in projector.layers))
            model(torch.randn(8, 3, 6, 6, generator=generator, dtype=torch.float64)).square().sum().backward()
            step()
            optimizer.zero_grad()
            counts.append(len(compiles))
        return [p.detach() for p in model.parameters()], counts, ranks

    eager, _, ranks = run(compiled=False)
    compiles.clear()
    compiled, counts, compiled_ranks = run(compiled=True)
    assert compiled_ranks == ranks and len(set(ranks)) == 3  # each refit changed the bases
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    layers = len(ranks[0])
    # counts[0..1]: SGD's first two steps differ (no momentum buffer yet), both compile.
    assert 0 < counts[2] - counts[1] <= layers  # first refit: at most one recompile per layer
    assert counts[3] == counts[2]  # same basis again: no new graph
    assert counts[5] == counts[3]  # second refit: nothing recompiled


def test_gradient_accumulation_projects_once_per_step(monkeypatch):  # RELIABILITY 35
    """Four micro-batches, then one step: one projection of each tracked gradient (SGD: the
    change needs none) and none per backward, and the same result as one step on the summed
    batch."""
    torch.manual_seed(0)
    model = small_model()
    twin = copy.deepcopy(model)
    projector = built_projector(model)
    model.eval(), twin.eval()  # no BatchNorm batch statistics: micro-batches sum exactly
    calls = []
    project = NullSpaceProjector.project_parameter_

    def counting(self, param, tensor):
        calls.append(param.removesuffix(".weight"))
        return project(self, param, tensor)

    monkeypatch.setattr(NullSpaceProjector, "project_parameter_", counting)
    optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), projector)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64, generator=generator)
    for chunk in x.chunk(4):
        model(chunk).square().sum().backward()
    assert calls == []
    optimizer.step()
    tracked = [name for name, layer in projector.layers.items() if projector.basis(name).shape[1] > 0]
    assert sorted(calls) == sorted(tracked)

    twin_projector = NullSpaceProjector(twin, dtype=torch.float64).load_state_dict(projector.state_dict())
    twin_optimizer = NullSpaceOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), twin_projector)
    twin(x).square().sum().backward()
    twin_optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_loads_an_inner_optimizer_state_dict_and_a_float_step():  # RELIABILITY 60
    """A checkpoint of the plain optimizer (no "null_space" entry, as before the wrapper) and
    one with a Python-number step (older torch) both load into the wrapper and step."""
    torch.manual_seed(0)
    model = small_model()
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    run_steps(model, plain, 2, 0)
    old = copy.deepcopy(plain.state_dict())
    for entry in old["state"].values():
        entry["step"] = float(entry["step"])
    projector = built_projector(model)
    for state in (plain.state_dict(), old):
        optimizer = NullSpaceOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), projector)
        optimizer.load_state_dict(copy.deepcopy(state))
        assert optimizer.untracked == "freeze" and optimizer.project_gradients
        before = [p.detach().clone() for p in model.parameters()]
        run_steps(model, optimizer, 1, 10)
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        weights = [layer.weight for layer in projector.layers.values()]
        assert all(float(optimizer.state[w]["step"]) == 3.0 for w in weights)  # biases stay frozen
