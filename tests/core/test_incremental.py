"""The class-by-class basis (the official code's GPM merge) from per-label covariances."""
import numpy as np
import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.solve.incremental import class_thresholds, incremental_basis, official_threshold


def gpm_reference(representations, thresholds):
    """GPM's SVD criterion on the representation matrices (inputs as columns), written from
    its description: a first class keeps the smallest k reaching its threshold, a later one
    adds top left singular vectors of the residual until the captured energy reaches it."""
    basis = None
    for r, t in zip(representations, thresholds):
        total = (r ** 2).sum()
        if basis is None:
            u, s, _ = np.linalg.svd(r, full_matrices=False)
            k = int(np.searchsorted(np.cumsum(s ** 2) / total, t - 1e-12) + 1)
            basis = u[:, :k]
            continue
        residual = r - basis @ (basis.T @ r)
        u, s, _ = np.linalg.svd(residual, full_matrices=False)
        captured = (total - (residual ** 2).sum()) / total
        k = 0
        while captured < t and k < len(s):
            captured += s[k] ** 2 / total
            k += 1
        basis = np.hstack([basis, u[:, :k]])
    return basis


def test_matches_gpm_svd_criterion_on_representation_matrices():
    rng = np.random.default_rng(0)
    d = 30
    shared = rng.standard_normal((d, 4))
    # each class: its own 6 directions, 4 shared ones, a little isotropic noise; flat spectra,
    # so every direction counts against the threshold
    reps = []
    for _ in range(4):
        own = rng.standard_normal((d, 6))
        reps.append(np.hstack([own, shared]) @ rng.standard_normal((10, 200)) + 0.05 * rng.standard_normal((d, 200)))
    thresholds = [0.9, 0.93, 0.96, 0.99]
    ours = incremental_basis([torch.tensor(r @ r.T) for r in reps], thresholds).numpy()
    ref = gpm_reference(reps, thresholds)
    assert ours.shape == ref.shape
    assert np.allclose(ours.T @ ours, np.eye(ours.shape[1]), atol=1e-8)
    # same subspace: projectors agree
    assert np.allclose(ours @ ours.T, ref @ ref.T, atol=1e-6)
    # every class reaches its threshold inside the final basis
    for r, t in zip(reps, thresholds):
        assert ((ours.T @ r) ** 2).sum() / (r ** 2).sum() >= t - 1e-9


def test_a_class_already_inside_adds_nothing_and_order_matters():
    e = torch.eye(4, dtype=torch.float64)
    first = torch.diag(torch.tensor([10.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    same = first.clone()
    basis = incremental_basis([first, same], [0.9, 0.9])
    assert basis.shape[1] == 1 and torch.allclose(basis.abs()[:, 0], e[0])
    other = torch.diag(torch.tensor([0.0, 0.0, 5.0, 0.1], dtype=torch.float64))
    assert incremental_basis([first, other], [0.9, 0.9]).shape[1] == 2


def test_official_thresholds_rise_with_the_label_and_cap():
    assert official_threshold(0, 0) == pytest.approx(0.97)
    assert official_threshold(9, 8) == pytest.approx(0.997)
    assert official_threshold(40, 3) == pytest.approx(0.997)
    assert class_thresholds([0, 2], None) == pytest.approx([0.97, 0.976])
    assert class_thresholds([0, 2], 0.99) == [0.99, 0.99]
    assert class_thresholds([0, 2], {0: 0.9, 2: 0.95}) == [0.9, 0.95]
    with pytest.raises(ValueError):
        class_thresholds([0], 1.5)


def test_projector_build_incremental_installs_bases_without_the_forgotten_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    projector = NullSpaceProjector(model, threshold=0.99)
    x = torch.randn(90, 6) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    y = torch.arange(90) % 3
    with projector.observe(labels=y):
        model(x)
    projector.build_incremental(exclude=[1])
    assert projector.built_from == (0, 2)
    for name in ("0", "2"):
        expected = incremental_basis([projector.store.matrix(k, name) for k in (0, 2)],
                                     class_thresholds([0, 2], None))
        assert projector.basis(name).shape == expected.shape
    # the update is projected onto the null space of what was kept
    model[0].weight.grad = torch.randn_like(model[0].weight)
    projector.project_()
    u = projector.basis("0").to(torch.float32)
    assert (model[0].weight.grad @ u).abs().max() < 1e-5
