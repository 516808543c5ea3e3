"""Frequent Directions sketches: the spectral bound, and a basis from the sketch that keeps at
least the threshold of the energy measured against the exact covariance."""
import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.sketch import FrequentDirections


def power_law_rows(n, d, decay=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ mixing.T).float()


def test_frequent_directions_bound():
    A = power_law_rows(1500, 128, decay=0.5)
    fd = FrequentDirections(128, rows=16)
    for chunk in A.split(250):
        fd.update(chunk)
    exact = A.double().T @ A.double()
    B = fd.matrix()
    error = torch.linalg.eigvalsh(exact - B.T @ B)
    scale = exact.diagonal().sum().item()
    assert error[0] >= -1e-12 * scale  # B^T B never exceeds A^T A
    assert error[-1] <= fd.shrunk * (1 + 1e-9) + 1e-12 * scale  # ||A^T A - B^T B||_2 <= shrunk
    assert fd.shrunk <= scale / 16  # <= ||A||_F^2 / l
    assert fd.trace == pytest.approx(scale, rel=1e-12) and fd.count == 1500
    assert B.shape[0] <= 32 and fd.shrunk > 0  # it did shrink


@pytest.mark.parametrize("threshold", [0.9, 0.97])
def test_sketched_basis_keeps_the_threshold_of_the_exact_energy(threshold):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 8))
    x = power_law_rows(2000, 256, decay=1.0)
    y = torch.arange(2000) % 4
    sketched = NullSpaceProjector(model, threshold=threshold, sketch={"0": 64})
    dense = NullSpaceProjector(model, threshold=threshold, dtype=torch.float64)
    for p in (sketched, dense):
        p.collect([(x[i : i + 500], y[i : i + 500]) for i in range(0, 2000, 500)])
        p.build(exclude=(3,))
    assert sketched.store.nbytes() == 0  # no d x d matrix for the sketched layer
    kept = y != 3
    exact = x[kept].double().T @ x[kept].double()
    U = sketched.basis("0").double()
    captured = (U.T @ exact @ U).trace() / exact.trace()
    assert captured >= threshold
    assert U.shape[1] >= dense.ranks()["0"]  # the guarantee costs at most some extra rank
    assert U.shape[1] <= 2 * dense.ranks()["0"] + 8


def test_sketch_is_chosen_under_a_budget_and_refuses_subtraction():
    model = nn.Sequential(nn.Linear(2048, 16), nn.ReLU(), nn.Linear(16, 4))
    # one total of the 2048-wide layer (two fp32 sets and a dense solve, 184 MB) does not fit:
    # sketched, 256 rows (5 keys x 2 copies x 512 x 2048 fp64 = 84 MB fit), per label
    proj = NullSpaceProjector(model, statistics="auto", num_labels=4, memory_budget=150_000_000)
    assert proj.sketch_rows == {"0": 256} and proj.statistics == "per_label"
    x, y = torch.randn(64, 2048), torch.arange(64) % 4
    proj.collect([(x, y)])
    proj.collect([(x[:8], y[:8])], forget=True)
    with pytest.raises(ValueError, match="layer '0' is sketched"):
        proj.build()
    proj.reset_forget()
    proj.build(exclude=(2,))
    assert proj.basis("0").shape[0] == 2048
    with pytest.raises(ValueError, match="cannot be sketched"):
        NullSpaceProjector(nn.Sequential(nn.Embedding(10, 4)), sketch={"0": 8})
