"""build(generator=...) does not depend on the global RNG (issue 29: two seeds of the global
RNG gave subspaces 0.998 apart on GPT-2's 512-wide MLP input, solved by a random sketch)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector, ops

WIDE = 512  # auto's randomized sketch starts at this width (ops.randomized.MIN_RANDOMIZED_DIM)


def observed_projector():
    model = nn.Sequential(nn.Linear(WIDE, 8), nn.ReLU(), nn.Linear(8, 4))
    generator = torch.Generator().manual_seed(0)
    # low-rank inputs with a decaying spectrum: auto picks the sketch for the wide layer
    x = torch.randn(400, 60, generator=generator) * torch.logspace(0, -3, 60) @ torch.randn(60, WIDE, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proj = NullSpaceProjector(model, threshold=0.99)
    with proj.observe():
        model(x)
    return proj


def bases_after(proj, global_seed, **build):
    torch.manual_seed(global_seed)
    torch.randn(1000)  # and some draws from it, as training would make
    proj.build(**build)
    return {name: proj.basis(name).clone() for name in ("0", "2")}


@pytest.mark.parametrize("method", ["auto", "randomized"])
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_seeded_build_ignores_the_global_rng(method, backend, monkeypatch):
    if backend == "ext":
        pytest.importorskip("unsc_fast._C")
    monkeypatch.setenv("UNSC_FAST_BACKEND", backend)
    proj = observed_projector()
    runs = [bases_after(proj, seed, method=method, generator=torch.Generator().manual_seed(7)) for seed in (1, 2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    # the sketch did run: without a generator the global RNG shows through
    free = [bases_after(proj, seed, method=method) for seed in (1, 2)]
    assert not torch.equal(free[0]["0"], free[1]["0"])
    assert ops.EIGENSOLVERS == ("auto", "eigh", "randomized")


def test_exact_build_needs_no_generator():
    proj = observed_projector()
    runs = [bases_after(proj, seed, method="eigh") for seed in (1, 2)]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
