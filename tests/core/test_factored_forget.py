"""A forget pass of few rows is kept as its factor (issue 22: 390 MB of float32 matrices for
two images on a ResNet-18). The factor is recovered to rounding from the committed sum, a sum
with more rank than rows stays dense, and every reader sees the same statistics as from the
dense sum: the kept sum, its diagonal, the build, a save and load, a fold."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.statistics import factored
from unsc_fast.statistics.policies import FORGET_KEY
from unsc_fast.statistics.store import CovarianceStore

from state_helpers import assert_bitwise_equal

ROUNDING = 1e-5  # float32: an exact step's residual is ~1e-7, a missed projection's ~1e-1


def rows_with_spectrum(r: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("r, d", [(1, 5), (3, 17), (32, 200), (50, 201)])
def test_the_factor_gives_back_the_sum_to_rounding(dtype, bound, r, d):
    X = rows_with_spectrum(r, d, dtype, seed=r + d)
    C = X.mT @ X
    before = C.clone()
    F_ = factored.psd_factor(C, r)
    assert F_ is not None and F_.shape[0] <= r and F_.dtype == torch.float64
    error = (F_.mT @ F_ - C.double()).abs().max() / C.double().abs().max()
    assert error <= bound
    assert torch.equal(C, before)  # read only


def test_a_sum_with_more_rank_than_its_rows_is_refused():
    X = rows_with_spectrum(40, 100)
    assert factored.psd_factor(X.mT @ X, 20) is None


def test_a_zero_sum_has_an_empty_factor():
    assert factored.psd_factor(torch.zeros(8, 8), 3).shape == (0, 8)


def test_the_store_keeps_a_small_forget_pass_factored_and_reads_it_as_the_dense_sum():
    d = 64
    dense, kept = CovarianceStore(torch.float32), CovarianceStore(torch.float32)
    total = rows_with_spectrum(400, d, torch.float32, seed=1)
    forget = [rows_with_spectrum(3, d, torch.float32, seed=s) for s in (2, 3)]
    for store, factor in ((dense, False), (kept, True)):
        store.add("total", "w", total.mT @ total, 400)
        for part in forget:  # two batches: the second is added into the factored first
            store.add(FORGET_KEY, "w", part.mT @ part, 3, factor=factor)
    assert kept.factored(FORGET_KEY, "w") and not dense.factored(FORGET_KEY, "w")
    assert kept.nbytes() < dense.nbytes() - d * d * 4 // 2
    assert kept.rows(FORGET_KEY, "w") == 6 and kept.has(FORGET_KEY, "w") and not kept.has(FORGET_KEY, "v")
    scale = float(dense.matrix(FORGET_KEY, "w").abs().max())
    torch.testing.assert_close(kept.matrix(FORGET_KEY, "w"), dense.matrix(FORGET_KEY, "w"), atol=4e-7 * scale, rtol=0)
    torch.testing.assert_close(kept.diagonal(FORGET_KEY, "w").float(), dense.diagonal(FORGET_KEY, "w"),
                               atol=4e-7 * scale, rtol=0)
    total_scale = float(dense.matrix("total", "w").abs().max())
    torch.testing.assert_close(kept.kept_sum("w", ["total"], [FORGET_KEY]), dense.kept_sum("w", ["total"], [FORGET_KEY]),
                               atol=4e-7 * total_scale, rtol=0)


def test_a_forget_pass_that_outgrows_its_factor_turns_dense():
    d = 32
    store = CovarianceStore(torch.float64)
    parts = [rows_with_spectrum(4, d, seed=s) for s in range(3)]
    for part in parts:
        store.add(FORGET_KEY, "w", part.mT @ part, 4, factor=True)
    assert not store.factored(FORGET_KEY, "w")  # 12 rows: more than a quarter of 32
    everything = torch.cat(parts)
    torch.testing.assert_close(store.matrix(FORGET_KEY, "w"), everything.mT @ everything, atol=1e-12, rtol=0)
    matrix, rows = store.pop(FORGET_KEY, "w")
    assert rows == 12 and matrix.shape == (d, d)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 16, 4, 4, generator=g) * torch.logspace(0, -2, 16)[:, None, None]
    return model, x, torch.arange(120) % 4


def observed(factor: bool, monkeypatch, **options) -> NullSpaceProjector:
    """One total, less a forget pass of two images (8 rows of the 144-wide conv input)."""
    monkeypatch.setattr(factored, "FACTOR_WIDTH_RATIO", 4 if factor else 10**9)
    model, x, y = model_and_data()
    proj = NullSpaceProjector(model, threshold=0.95, statistics="total", dtype=torch.float32, **options)
    proj.collect([(x[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)])
    forget = (y == 1).nonzero().flatten()[:2]
    proj.collect([(x[forget], y[forget])], forget=True)
    return proj


def test_a_build_from_the_factored_pass_is_the_dense_ones_and_keeps_the_guarantee(monkeypatch):
    dense = observed(False, monkeypatch).build()
    proj = observed(True, monkeypatch)
    assert proj.store.factored(FORGET_KEY, "0") and proj.store.factored(FORGET_KEY, "3")  # 8 rows of 144, 2 of 32
    assert not dense.store.factored(FORGET_KEY, "0")
    proj.build()
    assert proj.ranks() == dense.ranks()
    for name in ("0", "3"):
        U, V = proj.basis(name).double(), dense.basis(name).double()
        assert torch.linalg.matrix_norm(U @ U.mT - V @ V.mT, 2) < 1e-4, name
    model = proj.model
    start = {name: layer.weight.detach().clone() for name, layer in proj.layers.items()}
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), proj)
    _, x, y = model_and_data()
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:20]), (y[:20] + 1) % 4).backward()
        optimizer.step()
    for name, layer in proj.layers.items():
        change = layer.weight.detach() - start[name]
        assert change.norm() > 0 and proj.residual(layer.weight, change) < ROUNDING, name


def test_save_and_load_keep_the_factored_pass_statistics(monkeypatch, tmp_path):
    proj = observed(True, monkeypatch)
    path = tmp_path / "state.pt"
    proj.save(path)
    model, _, _ = model_and_data()
    loaded = NullSpaceProjector(model, threshold=0.95, statistics="total", dtype=torch.float32).load(path)
    for name in ("0", "3"):
        assert loaded.store.factored(FORGET_KEY, name), name  # saved as its factor, exactly
        assert torch.equal(loaded.store.matrix(FORGET_KEY, name), proj.store.matrix(FORGET_KEY, name))
    assert_bitwise_equal(loaded.state_dict(), proj.state_dict(), "projector")
    assert loaded.build().ranks() == proj.build().ranks()


def test_a_damaged_factor_in_a_state_is_refused_naming_the_layer(monkeypatch, tmp_path):
    from unsc_fast.projection.checksum import seal_state
    from unsc_fast.projector.state_validation import StateError

    proj = observed(True, monkeypatch)
    state = proj.state_dict()
    entry = next(e for e in state["groups"] if e["key"] == FORGET_KEY)
    model, _, _ = model_and_data()
    fresh = lambda: NullSpaceProjector(model, threshold=0.95, statistics="total", dtype=torch.float32)
    cases = {
        "more rows than counted": torch.zeros(9, 144, dtype=torch.float64),
        "wrong width": torch.zeros(2, 143, dtype=torch.float64),
        "NaN": torch.full((2, 144), float("nan"), dtype=torch.float64),
    }
    for what, factor in cases.items():
        damaged = copy.deepcopy(state)
        next(e for e in damaged["groups"] if e["key"] == FORGET_KEY)["factors"]["0"] = factor
        with pytest.raises(StateError, match="layer '0' factor"):
            fresh().load_state_dict(seal_state(damaged))
    both = copy.deepcopy(state)
    target = next(e for e in both["groups"] if e["key"] == FORGET_KEY)
    target["covariances"]["0"] = torch.zeros(144, 144)
    with pytest.raises(StateError, match="exactly one"):
        fresh().load_state_dict(seal_state(both))
    assert "factors" in entry and set(entry["factors"]) == {"0", "3"}


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-2), (torch.float64, 1e-3)])
def test_a_row_of_little_energy_is_kept_not_dropped_as_noise(dtype, scale):
    """A forget sample with a ten-thousandth (float32) or a millionth (float64) of the others'
    energy, far above the sum's rounding (found by the stateful machine: a float64 store's factor
    had dropped such a row, 2e-5 off the exact sum), is a direction of the sum: the factor keeps
    it to the dtype's own precision."""
    X = rows_with_spectrum(3, 12, torch.float64, seed=7)
    X[2] *= scale
    C = (X.mT @ X).to(dtype)
    F_ = factored.psd_factor(C, 3)
    assert F_ is not None and F_.shape[0] == 3
    error = (F_.mT @ F_ - C.double()).abs().max() / C.double().abs().max()
    assert error <= 16 * torch.finfo(dtype).eps
