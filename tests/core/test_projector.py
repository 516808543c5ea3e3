"""NullSpaceProjector: covariance collection, geometry, the null-space property, lifecycle, errors."""
import copy
import functools
import gc
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceProjector
from state_helpers import assert_bitwise_equal


class Tokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C): lets a Linear see a 3-D input."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


def awkward_model() -> nn.Sequential:
    """Every conv geometry the projector must get right, then Linear layers on 3-D and 2-D inputs."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2),
        nn.Tanh(),
        nn.Conv2d(6, 5, (3, 2), padding="same", padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(5, 5, (2, 3), padding="same"),  # even kernel: asymmetric zero padding
        nn.Tanh(),
        nn.Conv2d(5, 12, (2, 3), stride=2, padding=(1, 2), padding_mode="circular", bias=False),
        nn.Tanh(),
        nn.Conv2d(12, 16, 1),
        Tokens(),
        nn.Linear(16, 9),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Capture each tracked layer's input with an independent hook."""
    seen, handles = {}, []

    def remember(name, module, args, output):
        seen.setdefault(name, args[0])

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(functools.partial(remember, name)))
    model(x)
    for handle in handles:
        handle.remove()
    return seen


def layer_output_change(module: nn.Module, x: torch.Tensor, weight_change: torch.Tensor) -> torch.Tensor:
    """How the layer's output moves on ``x`` when its weight moves by ``weight_change`` (no bias)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight_change)
    return module._conv_forward(x, weight_change, None)


@pytest.fixture
def awkward():
    torch.manual_seed(0)
    model = awkward_model()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    model(x)  # materialise the LazyLinear
    return model, x


def test_null_space_property_on_awkward_geometry(awkward):
    """After project_(), dW a = 0 for every remaining input a of every layer; the rest survives."""
    model, x = awkward
    x = x[:1]  # few rows, so every layer's remaining inputs leave a null space
    projector = NullSpaceProjector(model, threshold=1.0, dtype=torch.float64)
    with projector.observe():
        model(x)
    projector.build()
    inputs = layer_inputs(model, x)
    model(torch.randn(3, 4, 9, 7, dtype=torch.float64)).square().sum().backward()
    raw = {name: layer.weight.grad.clone() for name, layer in projector.layers.items()}
    projector.project_()
    for name, layer in projector.layers.items():
        projected = layer.weight.grad
        assert 0 < projector.basis(name).shape[1] < layer.dim, name  # a real, partial null space
        moved = layer_output_change(layer.module, inputs[name], projected).abs().max()
        unprojected = layer_output_change(layer.module, inputs[name], raw[name]).abs().max()
        assert moved <= 1e-9 * unprojected, name
        # The null-space part of the gradient is untouched.
        U = projector.basis(name)
        rest = (raw[name] - projected).reshape(len(projected), -1)
        assert torch.allclose(rest, rest @ U @ U.T, atol=1e-10), name
        assert projected.norm() > 0.1 * raw[name].norm(), name


def test_linear_3d_input_covariance():
    torch.manual_seed(0)
    linear = nn.Linear(5, 2)
    x = torch.randn(3, 7, 5)
    projector = NullSpaceProjector(linear)
    with projector.observe():
        linear(x)
    rows = x.reshape(-1, 5)
    torch.testing.assert_close(projector.covariance(""), rows.T @ rows)
    assert projector.count("all", "") == 21


def test_conv_covariance_matches_explicit_unfold(awkward):
    model, x = awkward
    projector = NullSpaceProjector(model, dtype=torch.float64)
    with projector.observe():
        model(x)
    inputs = layer_inputs(model, x)
    for name, layer in projector.layers.items():
        if layer.kind != "conv2d":
            continue
        conv = layer.module
        padded = F.pad(inputs[name], conv._reversed_padding_repeated_twice,
                       mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        rows = cols.transpose(1, 2).reshape(-1, layer.dim)
        # W.flatten(1) @ patch reproduces the conv: the column order is the weight's.
        out = (rows @ conv.weight.flatten(1).T).reshape(len(x), -1, conv.out_channels)
        expected = (conv(inputs[name]) - conv.bias.view(1, -1, 1, 1)) if conv.bias is not None else conv(inputs[name])
        torch.testing.assert_close(out.transpose(1, 2).reshape(expected.shape), expected)
        torch.testing.assert_close(projector.covariance(name), rows.T @ rows)


def test_per_label_groups_sum_to_the_whole_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(10, 2, 4, 4), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 7])
    by_label, whole = NullSpaceProjector(model), NullSpaceProjector(model)
    with by_label.observe(labels=y):
        model(x)
    with whole.observe():
        model(x)
    assert sorted(by_label.groups) == [0, 1, 2, 7]
    for name in whole.layers:
        torch.testing.assert_close(by_label.covariance(name), whole.covariance(name), rtol=1e-5, atol=1e-5)
        only_seven = x[y == 7]
        seven = NullSpaceProjector(model)
        with seven.observe(group="seven"):
            model(only_seven)
        torch.testing.assert_close(by_label.covariance(name, [7]), seven.covariance(name))
    assert by_label.count(1, "2") == 3


def test_streaming_unequal_batches_equals_one_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(23, 6, dtype=torch.float64)
    streamed, once = NullSpaceProjector(model, dtype=torch.float64), NullSpaceProjector(model, dtype=torch.float64)
    for chunk in (x[:1], x[1:8], x[8:]):
        with streamed.observe():
            model(chunk)
    with once.observe():
        model(x)
    for name in once.layers:
        torch.testing.assert_close(streamed.covariance(name), once.covariance(name))
        assert streamed.count("all", name) == once.count("all", name) == 23


def test_second_request_needs_no_new_pass():
    """Forgetting another class is a different sum of stored covariances, then a basis."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(60, 8), torch.arange(60) % 3
    projector = NullSpaceProjector(model, threshold=0.9)
    with projector.observe(labels=y):
        model(x)
    first = projector.build(exclude=(0,)).basis("0").clone()
    direct = NullSpaceProjector(model, threshold=0.9)
    with direct.observe():
        model(x[y != 0])
    torch.testing.assert_close(first @ first.T, direct.build().basis("0") @ direct.basis("0").T, atol=1e-5, rtol=0)
    second = projector.build(exclude=(1,)).basis("0")
    assert projector.built_from == (0, 2)
    assert not torch.allclose(first @ first.T, second @ second.T, atol=1e-3)


def test_subtract_removes_a_separately_observed_subset():
    torch.manual_seed(0)
    model = nn.Linear(6, 2).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    projector = NullSpaceProjector(model, threshold=0.95, dtype=torch.float64)
    with projector.observe(group="everything"):
        model(x)
    with projector.observe(group="request"):
        model(x[:10])
    projector.build(subtract=("request",))
    kept = NullSpaceProjector(model, threshold=0.95, dtype=torch.float64)
    with kept.observe():
        model(x[10:])
    kept.build()
    U, V = projector.basis(""), kept.basis("")
    torch.testing.assert_close(U @ U.T, V @ V.T, atol=1e-8, rtol=0)


def test_low_precision_and_autocast_inputs_accumulate_in_float32():
    torch.manual_seed(0)
    linear = nn.Linear(16, 4)
    x = torch.randn(4096, 16) + 3
    projector = NullSpaceProjector(linear)
    with projector.observe():
        linear.bfloat16()(x.bfloat16())
    C = projector.covariance("")
    assert C.dtype == torch.float32
    rows = x.bfloat16().double()
    torch.testing.assert_close(C.double(), rows.T @ rows, rtol=1e-5, atol=0)
    linear.float()
    with projector.observe(group="autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x)
    assert projector.covariance("", ["autocast"]).dtype == torch.float32


def test_keyword_input_is_seen():
    linear = nn.Linear(3, 2)
    projector = NullSpaceProjector(linear)
    with projector.observe():
        linear(input=torch.ones(4, 3))
    assert projector.count("all", "") == 4


def test_hooks_removed_after_exit_and_after_errors():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with pytest.raises(RuntimeError, match="boom"):
        with projector.observe():
            model(torch.randn(2, 3))
            raise RuntimeError("boom")
    assert projector.count("all", "0") == 2  # the forward completed before the raise: it was committed
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with projector.observe():
        model(torch.randn(2, 3))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    model(torch.randn(2, 3))  # outside observe: nothing accumulates
    assert projector.count("all", "0") == 4


def test_observation_is_released():
    model = nn.Linear(3, 2)
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(torch.randn(2, 3))
        observation = weakref.ref(projector._observation)
    gc.collect()
    assert observation() is None


def test_no_leak_over_many_observations_and_instances():  # RELIABILITY 22
    """200 observe/exit cycles leave Python memory flat and no hook behind; 100 models with
    a built projector and a wrapped optimizer are all freed once dropped (hooks closing over
    the projector would keep every model alive)."""
    import tracemalloc

    from unsc_fast import NullSpaceOptimizer

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    projector = NullSpaceProjector(model)
    x = torch.randn(2, 2, 6, 6)

    def cycles(count):
        for index in range(count):
            with projector.observe(labels=torch.tensor([index % 3, 0])):
                model(x)

    cycles(20)  # warm-up: per-label covariances and caches exist from here on
    gc.collect()
    tracemalloc.start()
    try:
        cycles(20)
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        cycles(200)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"{growth} bytes retained by 200 observe() cycles"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    alive = []
    for _ in range(100):
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
        projector = NullSpaceProjector(model)
        with projector.observe():
            model(x)
        optimizer = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), projector.build())
        model(x).sum().backward()
        optimizer.step()
        alive.append(weakref.ref(model))
        del model, projector, optimizer
    gc.collect()
    assert sum(ref() is not None for ref in alive) == 0


def test_labels_length_mismatch_loses_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with projector.observe(labels=torch.tensor([0, 1])):
        model(torch.randn(2, 4))
    before = {k: {n: projector.store.matrix(k, n).clone() for n in projector.layers if projector.store.matrix(k, n) is not None} for k in projector.groups}
    with pytest.raises(ValueError, match=r"layer '0'.*labels has 3 entries.*batch size 2"):
        with projector.observe(labels=torch.tensor([0, 1, 1])):
            model(torch.randn(2, 4))
    assert projector.groups == list(before)
    for key in before:
        for name in before[key]:
            assert torch.equal(projector.store.matrix(key, name), before[key][name])


def test_non_finite_activations_are_rejected_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(torch.randn(5, 4))
    before = {n: projector.store.matrix("all", n).clone() for n in projector.layers}
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")  # layer '0' sees finite inputs, layer '1' does not
    with pytest.raises(ValueError, match=r"layer '1'.*NaN or Inf"):
        with projector.observe():
            model(torch.randn(5, 4))
    for name, tensor in before.items():
        assert torch.equal(projector.store.matrix("all", name), tensor), name
    assert projector.count("all", "0") == 5


def test_failed_forward_inside_a_block_is_not_committed_later():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with projector.observe(labels=torch.tensor([0, 1])):
        with pytest.raises(ValueError):
            model(torch.randn(3, 4))  # rejected
        model(torch.randn(2, 4))  # accepted
    assert projector.count(0, "0") + projector.count(1, "0") == 2


def test_threshold_and_argument_errors():
    model = nn.Linear(3, 2)
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            NullSpaceProjector(model, threshold=bad)
    with pytest.raises(TypeError, match="threshold"):
        NullSpaceProjector(model, threshold="high")
    with pytest.raises(TypeError, match="dtype"):
        NullSpaceProjector(model, dtype=torch.float16)
    projector = NullSpaceProjector(model)
    with pytest.raises(ValueError, match="labels= or group="):
        with projector.observe(labels=torch.tensor([0]), group="x"):
            pass
    with pytest.raises(TypeError, match="integer"):
        with projector.observe(labels=torch.tensor([0.5])):
            pass
    with pytest.raises(ValueError, match="threshold"):
        projector.build(threshold=2)


def test_build_method_picks_the_eigensolver():
    """``build(method=...)``: "eigh" gives the dense reference bases; "randomized" holds the
    threshold; a bad name is refused and leaves the previous bases in place."""
    from unsc_fast import ops
    from unsc_fast.ops import reference

    torch.manual_seed(0)
    model = nn.Linear(600, 2)
    projector = NullSpaceProjector(model, threshold=0.9, dtype=torch.float64)
    with projector.observe():
        model(torch.randn(700, 600) @ torch.diag(torch.logspace(0, -3, 600)))
    dense = projector.build(method="eigh").basis("")
    assert torch.equal(dense, reference.energy_basis_eigh(projector.covariance(""), 0.9))
    sketched = projector.build(method="randomized", generator=torch.Generator().manual_seed(0)).basis("")
    C = projector.covariance("")
    assert float(torch.trace(sketched.mT @ C @ sketched) / torch.trace(C)) >= 0.9
    assert sketched.shape[1] >= dense.shape[1]
    with pytest.raises(ValueError, match=r"method must be one of .*'svd'"):
        projector.build(method="svd")
    assert torch.equal(projector.basis(""), sketched)
    assert ops.EIGENSOLVERS == ("auto", "eigh", "randomized")


def test_build_before_observe_and_empty_selection():
    model = nn.Linear(3, 2)
    projector = NullSpaceProjector(model)
    with pytest.raises(RuntimeError, match="observe"):
        projector.build()
    with pytest.raises(RuntimeError, match="build"):
        projector.project_()
    with pytest.raises(RuntimeError, match="build"):
        projector.basis("")
    with projector.observe(labels=torch.tensor([1, 1])):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="no key left"):
        projector.build(exclude=(1,))
    # A label never observed: the class meant to be forgotten may hide under another key.
    with pytest.raises(ValueError, match=r"\[5\] were never observed.*allow_unobserved"):
        projector.build(exclude=(5,))
    with pytest.warns(UserWarning, match="never observed"):
        projector.build(exclude=(5,), allow_unobserved=True)
    # Scalars of every kind name the same label (issue 10.5).
    import numpy as np

    for label in (1, np.int64(1), torch.tensor(1), [torch.tensor(1)], (np.int32(1),)):
        with pytest.raises(ValueError, match="no key left"):
            projector.build(exclude=label)


def test_layer_never_called_is_named_at_build():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with projector.observe():
        model[0](torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"layer '1' saw no input"):
        projector.build()


def test_module_selection_and_unsupported_layers():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Bilinear(4, 4, 2))
    with pytest.warns(UserWarning, match=r"2\.weight \(2, 4, 4\)") as caught:
        projector = NullSpaceProjector(model)
    assert "1 trainable weight parameter(s)" in str(caught[0].message)
    assert list(projector.layers) == ["0", "1"]
    with pytest.raises(ValueError, match="strict=True.*2.weight"):
        NullSpaceProjector(model, strict=True)
    with pytest.raises(ValueError, match="unknown module name 'nope'"):
        NullSpaceProjector(model, modules=["nope"])
    with pytest.raises(TypeError, match=r"'2' is a Bilinear, which has no adapter"):
        NullSpaceProjector(model, modules=["2"])
    assert list(NullSpaceProjector(model, modules=["1"]).layers) == ["1"]
    with pytest.raises(ValueError, match="no layer that an adapter tracks"):
        NullSpaceProjector(nn.ReLU())


def test_meta_and_lazy_weights_are_refused():
    with pytest.raises(NotImplementedError, match="meta"):
        NullSpaceProjector(nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match="lazy"):
        NullSpaceProjector(nn.LazyLinear(2))
    model = nn.Linear(3, 2, device="meta").to_empty(device="cpu")
    assert list(NullSpaceProjector(model).layers) == [""]


def test_resized_layer_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(torch.randn(4, 3))
    projector.build()
    projector.project_tensor_("1", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"parameter '1.weight'.*does not match"):
        projector.project_tensor_("1", torch.zeros(2, 4))


def test_zero_inputs_give_an_empty_basis_and_identity_projection():
    model = nn.Linear(4, 3, bias=False)
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(torch.zeros(5, 4))
    projector.build()
    assert projector.basis("").shape == (4, 0)
    G = torch.randn(3, 4)
    assert torch.equal(projector.project_tensor_("", G.clone()), G)


def test_complement_path_equals_direct_projection():
    """When k > d/2 the projector keeps the null space instead; the result is the same."""
    torch.manual_seed(0)
    model = nn.Linear(12, 3).double()
    projector = NullSpaceProjector(model, threshold=0.999, dtype=torch.float64)
    with projector.observe():
        model(torch.randn(50, 12, dtype=torch.float64) @ torch.diag(torch.linspace(1, 2, 12, dtype=torch.float64)))
    projector.build()
    U = projector.basis("")
    assert U.shape[1] > 6 and "" in projector._complements
    G = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(projector.project_tensor_("", G.clone()), G - G @ U @ U.T)


def test_channels_last_gradient_is_projected_in_place():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double()
    projector = NullSpaceProjector(conv, threshold=0.9, dtype=torch.float64)
    with projector.observe():
        conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    projector.build()
    G = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    expected = projector.project_tensor_("", G.clone())
    strided = G.clone().to(memory_format=torch.channels_last)
    result = projector.project_tensor_("", strided)
    assert result is strided
    torch.testing.assert_close(strided, expected)


def test_state_dict_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    projector = NullSpaceProjector(model, threshold=0.95)
    with projector.observe(labels=torch.tensor([0, 1, 1, 2])):
        model(torch.randn(4, 2, 4, 4))
    with projector.observe(group="extra"):
        model(torch.randn(3, 2, 4, 4))
    projector.build(exclude=(2,))
    path = tmp_path / "projector.pt"
    projector.save(path)
    restored = NullSpaceProjector(copy.deepcopy(model), threshold=0.5).load(path)
    assert restored.threshold == 0.95 and restored.groups == projector.groups
    assert restored.built_from == projector.built_from
    for name in projector.layers:
        assert torch.equal(restored.basis(name), projector.basis(name))
        for key in projector.groups:
            assert torch.equal(restored.covariance(name, [key]), projector.covariance(name, [key]))
            assert restored.count(key, name) == projector.count(key, name)
    # a resumed projector builds the same bases for a new request
    torch.testing.assert_close(restored.build(exclude=(0,)).basis("2"), projector.build(exclude=(0,)).basis("2"))


def test_state_dict_for_another_model_is_refused():
    projector = NullSpaceProjector(nn.Linear(3, 2))
    with projector.observe():
        projector.model(torch.randn(2, 3))
    other = NullSpaceProjector(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="different input widths"):
        other.load_state_dict(projector.state_dict())
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"layers": {}})


def test_failed_build_keeps_previous_bases():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    projector = NullSpaceProjector(model)
    with projector.observe(labels=torch.tensor([0, 1])):
        model(torch.randn(2, 4))
    projector.build()
    basis = projector.basis("").clone()
    projector.store.matrix(1, "")[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        projector.build()
    assert torch.equal(projector.basis(""), basis)


def test_nested_observe_is_refused():
    projector = NullSpaceProjector(nn.Linear(3, 2))
    with projector.observe():
        with pytest.raises(RuntimeError, match="does not nest"):
            with projector.observe():
                pass


def test_ddp_style_wrapper_is_unwrapped():
    model = nn.Linear(3, 2)
    wrapped = nn.DataParallel(model)
    projector = NullSpaceProjector(wrapped)
    assert projector.model is model and list(projector.layers) == [""]


def test_compiled_model_is_unwrapped_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    compiled = torch.compile(model, backend="eager")
    with pytest.warns(UserWarning, match="compiled"):
        projector = NullSpaceProjector(compiled)
    assert list(projector.layers) == ["0", "2"]
    with projector.observe():
        model(torch.randn(2, 3))
    assert projector.count("all", "2") == 2


def test_a_block_that_runs_no_layer_warns():
    projector = NullSpaceProjector(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="no tracked layer ran"):
        with projector.observe():
            pass


def test_refit_accumulates_and_reset_forgets():
    model = nn.Linear(3, 2)
    projector = NullSpaceProjector(model)
    for _ in range(2):
        with projector.observe(labels=torch.tensor([0, 1])):
            model(torch.randn(2, 3))
    assert projector.count(0, "") == 2  # a second pass adds to the first (continual requests)
    projector.reset([0])
    assert projector.groups == [1]
    projector.reset()
    assert projector.groups == []


@pytest.mark.parametrize("sketch", [None, {"2": 2}])
def test_resetting_a_label_inside_one_total_is_refused_and_loses_nothing(sketch):
    """Under one total a label's rows cannot be taken out of the sum: ``reset([label])`` used to
    drop only its sketches (or nothing), leaving the total's layers protecting it."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    projector = NullSpaceProjector(model, statistics="total", sketch=sketch)
    with projector.observe(labels=torch.tensor([0, 1, 1])):
        model(torch.randn(3, 4))
    before = copy.deepcopy(projector.state_dict())
    dense = "['0']" if sketch else "['0', '2']"  # the sketched layer keeps its rows per label
    with pytest.raises(ValueError, match=r"reset\(\[0\]\): under statistics='total'.*layers " + re.escape(dense)):
        projector.reset([0])
    assert_bitwise_equal(projector.state_dict(), before, "projector")
    projector.reset(["total"])  # the total itself can go, and then what is left of the labels
    projector.reset([0])
    assert projector.groups == ([1] if sketch else [])


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 3, 2, 5),
        lambda: torch.randn(4, 3, 2, 5).to(memory_format=torch.channels_last),
        lambda: torch.randn(5, 2, 3, 4).permute(3, 2, 1, 0),
        lambda: torch.randn(4, 6, 2, 5)[:, ::2],
        lambda: torch.randn(4, 3, 1, 1).to(memory_format=torch.channels_last),
        lambda: torch.randn(8, 3, 2, 5)[::2],
        lambda: torch.randn(4, 7),
    ],
    ids=["contiguous", "channels_last", "permuted", "sliced_channels", "1x1_channels_last", "sliced_rows", "linear"],
)
def test_matrix_is_view_tells_when_reshape_copies(make):
    from unsc_fast.adapters.base import trailing_dims_merge_as_view

    tensor = make()
    matrix = tensor.reshape(tensor.shape[0], -1)
    shares = matrix.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    assert trailing_dims_merge_as_view(tensor) == shares


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode", "eval"])
def test_only_observe_blocks_record_whatever_the_grad_mode(mode):
    """Hooks fire in eval, no_grad and inference_mode alike (opacus#176): recording must be
    the explicit observe() block, never a side effect of any forward."""
    model = nn.Sequential(nn.Linear(4, 3))
    projector = NullSpaceProjector(model)
    x = torch.randn(5, 4)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode, "eval": torch.enable_grad}[mode]
    if mode == "eval":
        model.eval()
    with context():
        model(x)  # outside observe(): nothing is recorded
        assert projector.groups == []
        with projector.observe():
            model(x)
    assert projector.count("all", "0") == 5
    torch.testing.assert_close(projector.covariance("0"), x.T @ x)


def test_a_module_called_twice_per_forward_counts_both_calls():
    """Documented behaviour (README, Limitations): a shared module contributes every call."""
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(self.shared(x))

    model = Twice()
    projector = NullSpaceProjector(model)
    x = torch.randn(6, 4)
    with torch.no_grad(), projector.observe():
        model(x)
    assert projector.count("all", "shared") == 12
    with torch.no_grad():
        both = torch.cat([x, shared(x)])
    torch.testing.assert_close(projector.covariance("shared"), both.T @ both)
