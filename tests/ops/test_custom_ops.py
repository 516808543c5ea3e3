"""The in-place ops as PyTorch custom operators (RELIABILITY items 9 and 10).

``torch.library.opcheck`` (schema, autograd registration, fake tensors, AOT dispatch with
dynamic shapes) on CPU samples, contiguous and not, fp32 and bf16, with both the "torch"
and the (interpreted) "triton" implementation; ``torch.compile(fullgraph=True)`` around
the public ``unsc_fast.ops`` functions gives no graph break and eager's result.

The "triton" cases use CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when
there is no CUDA) and CUDA tensors on a GPU machine; the "torch" cases always use CPU.
"""
import os

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector, ops
from unsc_fast.ops import custom_ops  # noqa: F401  (registers torch.ops.unsc_fast.*)
from unsc_fast.ops.dispatch import extension_available, triton_available, triton_interpreting

BACKENDS = ["torch", "triton"]
# The covariance ops also have the extension's CPU kernels (skipped where it is not built,
# except under UNSC_FAST_REQUIRE_EXT=1, as in CI).
COVARIANCE_BACKENDS = BACKENDS + ["ext"]
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend: str) -> str:
    """Where a test of ``backend`` runs; skips "triton" where the kernels cannot run and
    "ext" where the extension is not built."""
    if backend == "ext" and not extension_available() and os.environ.get("UNSC_FAST_REQUIRE_EXT") != "1":
        pytest.skip("unsc_fast._C is not built")
    if backend != "triton":
        return "cpu"
    if not triton_available() or (TRITON_DEVICE == "cpu" and not triton_interpreting()):
        pytest.skip("needs triton, and CUDA or TRITON_INTERPRET=1")
    return TRITON_DEVICE


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed)).to(device)


def orthonormal(d: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    basis = torch.linalg.qr(torch.randn(d, k, generator=generator(seed), dtype=torch.float64))[0]
    return basis.float().to(device)


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


# ----------------------------------------------------------------------------- opcheck
def covariance_samples(device="cpu"):
    base = randn(24, 20, seed=1, device=device)
    zeros = lambda d: torch.zeros(d, d, device=device)  # noqa: E731
    return {
        "contiguous": (zeros(20), base.clone()),
        "x_transposed": (zeros(20), randn(20, 24, seed=2, device=device).T),
        "x_sliced": (zeros(10), base[::2, ::2]),
        "C_transposed": (randn(20, 20, seed=3, device=device).T, base.clone()),
        "x_bf16": (zeros(20), base.bfloat16()),
        "x_requires_grad": (zeros(20), base.clone().requires_grad_()),
    }


@pytest.mark.parametrize("backend", COVARIANCE_BACKENDS)
@pytest.mark.parametrize("sample", list(covariance_samples()))
def test_opcheck_covariance(sample, backend):
    C, x = covariance_samples(device_for(backend))[sample]
    opcheck(torch.ops.unsc_fast.covariance_.default, (C, x, backend))


def conv_covariance_samples(device="cpu"):
    x = randn(2, 3, 7, 6, seed=4, device=device)
    zeros = lambda d: torch.zeros(d, d, device=device)  # noqa: E731
    return {
        "contiguous": (zeros(27), x.clone(), [3, 3], [1, 1], [1, 1], [1, 1]),
        "channels_last_strided": (
            zeros(12), x.to(memory_format=torch.channels_last), [2, 2], [2, 1], [0, 1], [2, 1],
        ),
        "x_sliced_bf16": (zeros(27), x[:, :, ::2, :].bfloat16(), [3, 3], [1, 2], [1, 0], [1, 1]),
        "x_requires_grad": (zeros(27), x.clone().requires_grad_(), [3, 3], [2, 2], [1, 1], [1, 1]),
    }


@pytest.mark.parametrize("backend", COVARIANCE_BACKENDS)
@pytest.mark.parametrize("sample", list(conv_covariance_samples()))
def test_opcheck_conv_covariance(sample, backend):
    args = conv_covariance_samples(device_for(backend))[sample]
    opcheck(torch.ops.unsc_fast.conv_covariance_.default, (*args, backend))


def projection_samples(device="cpu"):
    U = orthonormal(20, 6, device=device)
    return {
        "contiguous": (randn(12, 20, seed=5, device=device), U),
        "G_transposed": (randn(20, 12, seed=6, device=device).T, U),
        "G_sliced": (randn(12, 40, seed=7, device=device)[:, ::2], U),
        "G_bf16": (randn(12, 20, seed=8, device=device).bfloat16(), U),
        "U_transposed": (randn(12, 20, seed=9, device=device), U.T.contiguous().T),
        "U_requires_grad": (randn(12, 20, seed=10, device=device), U.clone().requires_grad_()),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", list(projection_samples()))
@pytest.mark.parametrize("name", ["project_", "restrict_"])
def test_opcheck_projection(name, sample, backend):
    G, U = projection_samples(device_for(backend))[sample]
    opcheck(getattr(torch.ops.unsc_fast, name).default, (G, U, backend))


def test_schemas_declare_the_mutation():
    schemas = {name: str(getattr(torch.ops.unsc_fast, name).default._schema) for name in
               ("covariance_", "conv_covariance_", "project_", "restrict_")}
    assert schemas["covariance_"] == "unsc_fast::covariance_(Tensor(a0!) C, Tensor x, str backend) -> ()"
    assert schemas["project_"] == "unsc_fast::project_(Tensor(a0!) G, Tensor U, str backend) -> ()"
    assert schemas["restrict_"] == "unsc_fast::restrict_(Tensor(a0!) G, Tensor Q, str backend) -> ()"
    assert schemas["conv_covariance_"].startswith("unsc_fast::conv_covariance_(Tensor(a0!) C, Tensor x,")


def test_operator_wants_a_resolved_backend():
    with pytest.raises(ValueError, match="resolved name"):
        torch.ops.unsc_fast.project_(torch.randn(3, 4), orthonormal(4, 2), "auto")


# ------------------------------------------------------- the public functions around them
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_G_is_updated_in_place(backend):
    device = device_for(backend)
    U = orthonormal(20, 6, device=device)
    storage = randn(20, 30, seed=11, device=device)
    expected = storage.clone()
    G = storage.T[::2]  # (15, 20), strides (2, 30): transposed and sliced
    assert ops.project_(G, U, backend=backend) is G
    expected.T[::2] -= (expected.T[::2] @ U) @ U.T
    torch.testing.assert_close(storage, expected, rtol=1e-5, atol=1e-5)


def test_mutated_tensor_that_requires_grad_is_refused():
    G = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        ops.project_(G, orthonormal(6, 2), backend="torch")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        ops.covariance_(torch.zeros(6, 6, requires_grad=True), torch.randn(3, 6))
    with torch.no_grad():  # as before: allowed outside autograd
        ops.project_(G, orthonormal(6, 2), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_activations_that_require_grad_are_read_not_differentiated(backend):
    device = device_for(backend)
    x = randn(9, 5, seed=12, device=device).requires_grad_()
    C = ops.covariance_(torch.zeros(5, 5, device=device), x, backend=backend)
    assert C.grad_fn is None and not C.requires_grad
    torch.testing.assert_close(C, (x.T @ x).detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- torch.compile
def covariance_then_projection(G, U, C, x, backend):
    ops.covariance_(C, x, backend=backend)
    ops.project_(G, U, backend=backend)
    return G.square().sum() + C.trace()


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_matches_eager(compiler, backend):
    torch._dynamo.reset()
    device = device_for(backend)
    U = orthonormal(24, 5, device=device)
    x = randn(40, 24, seed=13, device=device).bfloat16()
    G0 = randn(24, 10, seed=14, device=device).T  # non-contiguous (10, 24)
    C0 = randn(24, 24, seed=15, device=device)
    G_eager, C_eager = G0.clone(), C0.clone()
    out_eager = covariance_then_projection(G_eager, U, C_eager, x, backend)

    explanation = torch._dynamo.explain(covariance_then_projection)(G0.clone(), U, C0.clone(), x, backend)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(covariance_then_projection, backend=compiler, fullgraph=True)
    G, C = G0.clone().T.contiguous().T, C0.clone()
    out = compiled(G, U, C, x, backend)
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(G, G_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C, C_eager, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_with_views_and_restrict():
    """Views made inside the graph (a conv weight's (out, in*kh*kw) matrix) are written back."""
    torch._dynamo.reset()
    Q = orthonormal(18, 4, seed=3)

    def step(grad, C, x):
        ops.conv_covariance_(C, x, 3, stride=2, padding=1)
        ops.restrict_(grad.reshape(grad.shape[0], -1), Q)
        return grad

    grad0 = torch.randn(5, 2, 3, 3, generator=generator(16))
    x = torch.randn(2, 2, 6, 6, generator=generator(17))
    grad_eager, C_eager = grad0.clone(), torch.zeros(18, 18)
    step(grad_eager, C_eager, x)
    grad, C = grad0.clone(), torch.zeros(18, 18)
    torch.compile(step, backend="aot_eager", fullgraph=True)(grad, C, x)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C, C_eager, rtol=1e-5, atol=1e-5)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(lambda G, U: ops.project_(G, U), backend="aot_eager", fullgraph=True, dynamic=True)
    for rows, d, k in [(6, 16, 3), (9, 21, 5)]:
        G0, U = torch.randn(rows, d, generator=generator(rows)), orthonormal(d, k)
        G = G0.clone()
        compiled(G, U)
        torch.testing.assert_close(G, G0 - (G0 @ U) @ U.T, rtol=1e-5, atol=1e-5)


def test_compiled_code_runs_the_backend_chosen_when_traced(monkeypatch):
    """``UNSC_FAST_BACKEND`` is read while tracing and the graph keeps that implementation;
    after ``torch.compiler.reset()`` a new value is honoured (see docs/kernels.md: Dynamo
    does not reliably guard environment reads, pytorch#189027)."""
    from unsc_fast.ops import reference
    from unsc_fast.kernels import projection

    calls = []
    for module, tag in ((reference, "torch"), (projection, "triton")):
        original = module.project_
        monkeypatch.setattr(module, "project_", lambda G, U, _f=original, _t=tag: calls.append(_t) or _f(G, U))
    device = device_for("triton")
    G0, U = randn(4, 8, seed=20, device=device), orthonormal(8, 2, device=device)
    for backend in ("torch", "triton", "torch"):
        monkeypatch.setenv("UNSC_FAST_BACKEND", backend)
        torch.compiler.reset()
        G = G0.clone()
        torch.compile(lambda G, U: ops.project_(G, U), backend="eager", fullgraph=True)(G, U)
        torch.testing.assert_close(G, G0 - (G0 @ U) @ U.T, rtol=1e-5, atol=1e-5)
        assert calls[-1] == backend
    assert calls == ["torch", "triton", "torch"]
    torch.compiler.reset()


# ------------------------------------------------------------------ the projector, compiled
def built_projector():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3),
    )
    x = torch.randn(4, 3, 6, 6)
    projector = NullSpaceProjector(model, threshold=0.9)
    with projector.observe():
        model(x)
    projector.build()
    model(x).square().sum().backward()
    return projector


def test_compiled_projector_matches_eager():
    """``projector.project_()`` under torch.compile (graph breaks allowed) equals eager,
    on a model whose layers take both the ``project_`` and the ``restrict_`` path."""
    torch._dynamo.reset()
    projector = built_projector()
    assert projector._complements and len(projector._complements) < len(projector.layers)
    grads = {name: layer.weight.grad.clone() for name, layer in projector.layers.items()}
    projector.project_()
    expected = {name: layer.weight.grad.clone() for name, layer in projector.layers.items()}
    for name, layer in projector.layers.items():
        layer.weight.grad.copy_(grads[name])
    torch.compile(projector.project_, backend="aot_eager")()
    for name, layer in projector.layers.items():
        torch.testing.assert_close(layer.weight.grad, expected[name], rtol=1e-5, atol=1e-6)


def test_compiled_projector_fullgraph():
    torch._dynamo.reset()
    projector = built_projector()
    grads = {name: layer.weight.grad.clone() for name, layer in projector.layers.items()}
    projector.project_()
    expected = {name: layer.weight.grad.clone() for name, layer in projector.layers.items()}
    for name, layer in projector.layers.items():
        layer.weight.grad.copy_(grads[name])
    torch.compile(projector.project_, backend="eager", fullgraph=True)()
    for name, layer in projector.layers.items():
        torch.testing.assert_close(layer.weight.grad, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("UNSC_FAST_TEST_INDUCTOR") != "1", reason="inductor on CPU compiles C++ (~30 s)")
def test_compile_inductor():
    torch._dynamo.reset()
    U = orthonormal(16, 4)
    x = torch.randn(10, 16, generator=generator(18))
    G0 = torch.randn(8, 16, generator=generator(19))
    G_eager, C_eager = G0.clone(), torch.zeros(16, 16)
    covariance_then_projection(G_eager, U, C_eager, x, "auto")
    G, C = G0.clone(), torch.zeros(16, 16)
    torch.compile(covariance_then_projection, backend="inductor", fullgraph=True)(G, U, C, x, "auto")
    torch.testing.assert_close(G, G_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C, C_eager, rtol=1e-5, atol=1e-5)
