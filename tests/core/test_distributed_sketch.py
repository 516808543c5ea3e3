"""Sketches and one total across two gloo processes: a sketched layer's pooled basis is bitwise the
same on every rank and keeps the threshold of the pooled data's energy, a sketch request that
cannot be served is refused on every rank alike, and a total's forget pass is subtracted."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import halves, run_ranks  # noqa: E402

from unsc_fast import NullSpaceProjector  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    g = torch.Generator().manual_seed(seed + 1)
    mixing = torch.randn(3, 1, generator=g)  # 3 channels made of 1: conv patches of rank <= 9 of 27
    x = torch.einsum("cb,nbhw->nchw", mixing, torch.randn(48, 1, 5, 5, generator=g))
    return model, x, torch.arange(48) % 4


def _sketch_scenario(rank: int, world: int) -> dict:
    model, x, y = make()
    xs, ys = halves(x, y, rank, world)
    pooled = NullSpaceProjector(model, threshold=0.9, sketch={"0": 8, "2": 6})
    pooled.collect([(xs[:12], ys[:12]), (xs[12:], ys[12:])])
    pooled.build(exclude=(1,))
    exact = NullSpaceProjector(model, threshold=0.9, statistics="per_label", dtype=torch.float64)
    exact.collect([(x, y)])  # every rank: all the data, the reference energies
    result = {"bases": {n: pooled.basis(n).clone() for n in pooled.protection.slots},
              "captured": {}, "ranks": pooled.ranks()}
    for name in pooled.protection.slots:
        C, U = exact.store.kept_sum(name, [0, 2, 3]), pooled.basis(name).double()
        result["captured"][name] = float((U.T @ C @ U).trace() / C.trace())
    pooled.collect([(xs[ys == 0][:2], ys[ys == 0][:2])], forget=True)  # rows of a kept label
    try:
        pooled.build(exclude=(1,))
        result["refused"] = None
    except ValueError as error:
        result["refused"] = str(error)
    return result


def test_sketched_layers_pool_across_ranks(tmp_path):
    first, second = run_ranks(_sketch_scenario, tmp_path)
    for name, basis in first["bases"].items():
        assert basis.dtype == torch.float64 and torch.equal(basis, second["bases"][name]), name
        assert first["captured"][name] >= 0.9 - 1e-9, name  # of the pooled (both ranks') kept energy
        assert basis.shape[1] < basis.shape[0], name
    assert "cannot be subtracted" in first["refused"] and first["refused"] == second["refused"]


def _total_scenario(rank: int, world: int) -> dict:
    model, x, y = make()
    xs, ys = halves(x, y, rank, world)
    total = NullSpaceProjector(model, threshold=0.95, statistics="total", class_rows=0)
    total.collect([(xs, ys)])
    total.collect([(xs[ys == 2], ys[ys == 2])], forget=True)  # class-wise request: each rank its part
    total.build(exclude=(2,))
    single = NullSpaceProjector(model, threshold=0.95, statistics="per_label", dtype=torch.float64)
    single.collect([(x, y)])
    single.build(exclude=(2,), process_group="local")
    return {n: (total.basis(n) @ total.basis(n).T, single.basis(n) @ single.basis(n).T) for n in total.layers}


def test_a_totals_forget_pass_is_subtracted_across_ranks(tmp_path):
    first, second = run_ranks(_total_scenario, tmp_path)
    for name, (pooled, single) in first.items():
        assert torch.equal(pooled, second[name][0]), name
        torch.testing.assert_close(pooled, single, atol=1e-8, rtol=0)


def _class_scenario(rank: int, world: int) -> dict:
    model, x, y = make()
    xs, ys = halves(x, y, rank, world)
    if rank == 1:  # label 3 on rank 0 only
        xs, ys = xs[ys != 3], ys[ys != 3]
    exact = NullSpaceProjector(model, statistics="per_label", dtype=torch.float64)
    sketched = NullSpaceProjector(model, statistics="total", class_rows=6)
    for p in (exact, sketched):
        p.collect([(xs, ys)])
    pooled_exact = {s.key: (s.trace, s.gram) for s in exact.class_statistics("2")}
    pooled_sketch = {s.key: (s.trace, s.gram) for s in sketched.class_statistics("2")}
    single = NullSpaceProjector(model, statistics="per_label", dtype=torch.float64)
    single.collect([(x[(torch.arange(48) < 24) | (y != 3)], y[(torch.arange(48) < 24) | (y != 3)])])
    return {"exact": pooled_exact, "sketch": pooled_sketch,
            "single": {k: single.store.matrix(k, "2") for k in single.groups}}


def test_class_statistics_pool_across_ranks(tmp_path):
    first, second = run_ranks(_class_scenario, tmp_path)
    assert sorted(first["exact"]) == sorted(first["sketch"]) == [0, 1, 2, 3]  # 3: one rank's only
    for key, (trace, gram) in first["exact"].items():
        assert torch.equal(gram, second["exact"][key][1])
        torch.testing.assert_close(gram, first["single"][key], rtol=1e-12, atol=1e-9)
    for key, (trace, gram) in first["sketch"].items():
        C = first["single"][key]
        assert torch.equal(gram, second["sketch"][key][1])
        assert trace == pytest.approx(C.trace().item(), rel=1e-6)
        assert torch.linalg.eigvalsh(C - gram)[0] >= -1e-6 * trace
