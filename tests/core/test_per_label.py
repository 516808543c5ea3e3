"""build(criterion="per_label"): every kept label keeps the threshold of its own input energy in
every layer (unsc_fast.solve.per_label), held against a brute-force reference, nested across
thresholds, reused across rebuilds of the same request, and refused where it cannot be served."""
import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.solve.per_label import label_spectrum


def observed(statistics="per_label", seed=0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    projector = NullSpaceProjector(model, statistics=statistics, **options)
    for label, scale in ((0, 1.0), (1, 3.0), (2, 0.2), (3, 1.5)):  # unequal energies: the point of the rule
        x = torch.randn(30, 7) * scale + label
        x[:, label] *= 4  # each label has a direction of its own
        with projector.observe(labels=torch.full((30,), label)):
            model(x)
    return model, projector


def reference_rank(projector, name, kept, threshold):
    """The smallest k (brute force) with which every kept label keeps ``threshold`` of its energy
    inside the kept sum's top-k eigenvectors."""
    total = sum(projector.store.matrix(k, name).double() for k in kept)
    vectors = torch.linalg.eigh((total + total.T) / 2).eigenvectors.flip(1)
    for k in range(vectors.shape[1] + 1):
        top = vectors[:, :k]
        if all(float(torch.trace(top.T @ projector.store.matrix(c, name).double() @ top))
               >= threshold * float(torch.trace(projector.store.matrix(c, name).double())) - 1e-12 for c in kept):
            return k
    return vectors.shape[1]


@pytest.mark.parametrize("threshold", [0.6, 0.9, 0.97, 0.999])
def test_every_kept_label_keeps_its_threshold_with_the_fewest_directions(threshold):
    _, projector = observed()
    projector.build(exclude=[3], threshold=threshold, criterion="per_label")
    for name in ("0", "2"):
        basis = projector.basis(name).double()
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-6)
        for label in (0, 1, 2):
            covariance = projector.store.matrix(label, name).double()
            kept = float(torch.trace(basis.T @ covariance @ basis)) / float(torch.trace(covariance))
            assert kept >= threshold - 1e-6, (name, label, kept)
        assert basis.shape[1] == reference_rank(projector, name, [0, 1, 2], threshold)


def test_the_summed_criterion_can_leave_a_small_label_short_the_per_label_one_cannot():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    projector = NullSpaceProjector(model)
    for label in range(4):
        x = torch.randn(30, 7) * 3.0
        x[:, 6] = 0.0
        if label == 2:  # a small label whose inputs lie mostly in a direction of its own
            x = torch.randn(30, 7) * 0.05
            x[:, 6] = torch.randn(30) * 0.5
        with projector.observe(labels=torch.full((30,), label)):
            model(x)
    projector.build(exclude=[3], threshold=0.9)
    total_basis = projector.basis("0").double()
    covariance = projector.store.matrix(2, "0").double()  # the low-energy label
    assert float(torch.trace(total_basis.T @ covariance @ total_basis)) / float(torch.trace(covariance)) < 0.9
    projector.build(exclude=[3], threshold=0.9, criterion="per_label")
    basis = projector.basis("0").double()
    assert float(torch.trace(basis.T @ covariance @ basis)) / float(torch.trace(covariance)) >= 0.9 - 1e-6


def test_bases_are_nested_and_a_rebuild_reuses_the_eigenvectors(monkeypatch):
    _, projector = observed()
    projector.build(exclude=[3], threshold=0.99, criterion="per_label")
    high = {n: projector.basis(n).clone() for n in ("0", "2")}
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or real(*a, **k))
    projector.build(exclude=[3], threshold=0.8, criterion="per_label")
    assert not calls  # the same request: re-cut, not solved again
    for name, basis in high.items():
        low = projector.basis(name)
        assert low.shape[1] <= basis.shape[1] and torch.equal(low, basis[:, : low.shape[1]])
    fresh = observed()[1].build(exclude=[3], threshold=0.8, criterion="per_label")
    for name in ("0", "2"):
        assert torch.equal(fresh.basis(name), projector.basis(name))
    # new data invalidates the cache
    with projector.observe(labels=torch.zeros(5, dtype=torch.long)):
        projector.model(torch.randn(5, 7))
    projector.build(exclude=[3], threshold=0.8, criterion="per_label")
    assert calls


def test_a_statistic_below_a_label_covariance_gives_a_conservative_cut():
    """A class sketch (gram <= C, exact trace) can only ask for more directions."""
    torch.manual_seed(1)
    rows = [torch.randn(40, 8) for _ in range(3)]
    covariances = [r.T @ r for r in rows]
    total = sum(covariances)
    exact = label_spectrum(total, [(i, float(torch.trace(c)), c) for i, c in enumerate(covariances)])
    sketches = []
    for i, c in enumerate(covariances):
        values, vectors = torch.linalg.eigh(c)
        top = vectors[:, -4:] * values[-4:].sqrt()  # the top 4 directions: B^T B <= C
        sketches.append((i, float(torch.trace(c)), top @ top.T))
    conservative = label_spectrum(total, sketches)
    for threshold in (0.3, 0.5, 0.7, 0.9):
        assert conservative.rank(threshold) >= exact.rank(threshold)


def test_per_label_requests_it_cannot_serve_are_refused():
    _, projector = observed(statistics="total", class_rows=0)  # one total, no class sketches
    with pytest.raises(ValueError, match='no per-label statistics'):
        projector.build(criterion="per_label")
    _, projector = observed()
    with pytest.raises(ValueError, match="criterion must be one of"):
        projector.build(criterion="per_class")
    with pytest.raises(ValueError, match="cannot subtract"):
        projector.build(exclude=[3], subtract=[2], criterion="per_label")


def test_a_grouped_conv_keeps_every_label_s_threshold_in_every_group():
    """Depthwise convs (ConvNeXt, MobileNet) keep one covariance per group: the per-label rule is
    solved group by group (it failed on the (groups, d, d) stack before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    projector = NullSpaceProjector(model, statistics="per_label")
    for label, scale in ((0, 1.0), (1, 3.0), (2, 0.3)):
        with projector.observe(labels=torch.full((6,), label)):
            model(torch.randn(6, 4, 5, 5) * scale + label)
    threshold = 0.9
    projector.build(exclude=[2], threshold=threshold, criterion="per_label")
    bases = projector.basis("0").double()  # (groups, d, k) zero-padded
    ranks = projector.ranks()["0"]
    for group in range(4):
        basis = bases[group, :, : ranks[group]]
        for label in (0, 1):
            covariance = projector.store.matrix(label, "0")[group].double()
            kept = float(torch.trace(basis.T @ covariance @ basis)) / float(torch.trace(covariance))
            assert kept >= threshold - 1e-6, (group, label, kept)
