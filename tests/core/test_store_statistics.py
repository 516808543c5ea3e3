"""Storage policies: one total less a forget pass serves class- and sample-wise requests with
the same basis as the remaining data alone; memory estimates, the auto choice and the budget."""
import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.statistics.policies import FORGET_KEY, TOTAL_KEY


def spectrum_data(n, d=24, rank=6, seed=0):
    """Rows with a clear energy cut: ``rank`` strong directions (a gap of 100x in energy below
    them), so the basis at the threshold is well defined and a rounding-level change of the
    covariance cannot move the cut."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    scales = torch.cat([torch.linspace(10, 5, rank), torch.full((d - rank,), 0.05)])
    return (torch.randn(n, d, generator=g) * scales) @ mixing.T


def model_and_data(n=1200, labels=10, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, labels))
    x = spectrum_data(n, seed=seed)
    y = torch.arange(n) % labels
    return model, x, y


def projectors(proj):
    return {name: proj.basis(name) @ proj.basis(name).T for name in proj.layers}


def batches(x, y, size=100):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def remaining_only(model, x, y):
    """Reference: fp64 statistics of the remaining data alone, observed directly."""
    ref = NullSpaceProjector(model, threshold=0.99, dtype=torch.float64)
    ref.collect(batches(x, y), labels=False)
    return ref.build()


# Bound: both sides are fp64 sums of the same rows in different orders, so the covariances
# agree to ~n * eps64 * ||C||; with a 100x energy gap at the cut the projectors U U^T then
# agree to far below 1e-8 (Davis-Kahan: ||dP|| <= ||dC|| / gap).
PROJECTOR_TOL = 1e-8


@pytest.mark.parametrize("share", [0.1, 0.9])
def test_total_minus_forget_equals_remaining_sample_wise(share):
    model, x, y = model_and_data()
    forget = torch.rand(len(x), generator=torch.Generator().manual_seed(1)) < share
    proj = NullSpaceProjector(model, threshold=0.99, statistics="total")
    assert proj.dtype == torch.float64  # the subtraction needs it
    proj.collect(batches(x, y))
    proj.collect(batches(x[forget], y[forget]), forget=True)
    proj.build()
    ref = remaining_only(model, x[~forget], y[~forget])
    assert proj.ranks() == ref.ranks()
    for name, p in projectors(proj).items():
        assert (p - projectors(ref)[name]).abs().max() < PROJECTOR_TOL, name
    C = proj.store.kept_sum(name, [TOTAL_KEY], [FORGET_KEY])
    assert torch.allclose(C, ref.covariance(name), rtol=0, atol=1e-9 * C.abs().max())


def test_total_minus_forget_class_wise_at_a_90_percent_share():
    model, x, y = model_and_data(labels=10)
    forget = y != 0  # 9 of 10 classes forgotten: the forget data is 90 % of the total
    proj = NullSpaceProjector(model, threshold=0.99, statistics="total")
    proj.collect(batches(x, y))
    proj.collect(batches(x[forget], y[forget]), forget=True)
    proj.build(exclude=range(1, 10))  # exclude is implied by the forget pass, and accepted
    ref = remaining_only(model, x[~forget], y[~forget])
    for name, p in projectors(proj).items():
        assert (p - projectors(ref)[name]).abs().max() < PROJECTOR_TOL, name


def test_fp32_total_cancels_at_a_large_share_which_is_why_total_defaults_to_fp64():
    model, x, y = model_and_data()
    forget = y != 0
    errors = {}
    for dtype in (torch.float32, torch.float64):
        proj = NullSpaceProjector(model, statistics="total", dtype=dtype)
        proj.collect(batches(x, y))
        proj.collect(batches(x[forget], y[forget]), forget=True)
        C = proj.store.kept_sum("0", [TOTAL_KEY], [FORGET_KEY]).double()
        R = x[~forget].double().T @ x[~forget].double()
        errors[dtype] = ((C - R).norm() / R.norm()).item()
    assert errors[torch.float64] < 1e-12
    assert errors[torch.float32] > 1e3 * errors[torch.float64]


def test_total_refuses_exclude_without_a_forget_pass():
    model, x, y = model_and_data()
    proj = NullSpaceProjector(model, statistics="total")
    proj.collect(batches(x, y))
    with pytest.raises(ValueError, match="forget=True"):
        proj.build(exclude=(3,))
    proj.build()  # no request: the basis of everything observed


def test_total_keeps_one_matrix_per_layer_whatever_the_labels():
    model, x, y = model_and_data(labels=10)
    proj = NullSpaceProjector(model, statistics="total")
    proj.collect(batches(x, y))
    assert proj.groups == [TOTAL_KEY]
    assert proj.store.nbytes() == sum(8 * l.dim**2 for l in proj.layers.values())


def test_per_label_forget_pass_serves_a_sample_wise_request_and_skips_excluded_labels():
    model, x, y = model_and_data()
    g = torch.Generator().manual_seed(2)
    forget = (torch.rand(len(x), generator=g) < 0.3) | (y == 4)
    proj = NullSpaceProjector(model, threshold=0.99, dtype=torch.float64)
    proj.collect(batches(x, y))
    proj.collect(batches(x[forget], y[forget]), forget=True)  # per label: (forget, label) keys
    assert (FORGET_KEY, 4) in proj.forget_keys and FORGET_KEY not in proj.groups
    proj.build(exclude=(4,))  # class 4 left out whole: its forget rows are not subtracted again
    ref = remaining_only(model, x[~forget], y[~forget])
    for name, p in projectors(proj).items():
        assert (p - projectors(ref)[name]).abs().max() < PROJECTOR_TOL, name
    proj.reset_forget()
    assert proj.forget_keys == []


def test_memory_estimate_counts_bytes_per_policy_and_layer():
    model, _, _ = model_and_data()
    proj = NullSpaceProjector(model)
    plan = proj.memory_estimate(labels=100)
    assert plan.per_layer("per_label") == {"0": 101 * 24 * 24 * 4, "2": 101 * 32 * 32 * 4}
    assert plan.per_layer("total") == {"0": 2 * 24 * 24 * 8, "2": 2 * 32 * 32 * 8}
    # + the larger of one pending set and the widest layer's solve (its kept sum, 3.5 fp64
    # d x d matrices of a dense eigendecomposition, and the basis copied out of them)
    assert plan.total("total") == 2 * 8 * (24 * 24 + 32 * 32) + 32 * 32 * (2 * 8 + 28)
    assert "per_label" in str(plan) and "'2'" not in str(plan)


# Peak bytes of the model above (slots d = 24 and 32): one fp32 set 6,400, one fp64 set
# 12,800; the widest solve 32^2 * (2 * 4 + 28) = 36,864 (fp32 sums) or 32^2 * (2 * 8 + 28) =
# 45,056 (fp64), the narrower one's after it smaller even beside the widest's basis.
PER_LABEL_10 = 11 * 6_400 + 36_864  # 107,264
TOTAL_FP64, TOTAL_FP32 = 2 * 12_800 + 45_056, 6_400 * 2 + 36_864  # 70,656 and 49,664


def test_auto_chooses_by_the_budget_and_refusals_name_the_layer_and_bytes():
    model, x, y = model_and_data()
    assert NullSpaceProjector(model, num_labels=10, memory_budget=PER_LABEL_10).statistics == "per_label"
    fp64 = NullSpaceProjector(model, num_labels=10, memory_budget=PER_LABEL_10 - 1)
    assert (fp64.statistics, fp64.dtype) == ("total", torch.float64)
    fp32 = NullSpaceProjector(model, num_labels=10, memory_budget=TOTAL_FP64 - 1)
    assert (fp32.statistics, fp32.dtype) == ("total", torch.float32)
    with pytest.raises(MemoryError, match=r"'2' \(d=32\) alone takes 4,096 bytes per set.*memory_budget="):
        NullSpaceProjector(model, statistics="per_label", num_labels=10, memory_budget=PER_LABEL_10 - 1)
    with pytest.raises(MemoryError, match="statistics=\"total\""):
        NullSpaceProjector(model, statistics="total", num_labels=10, memory_budget=1000)
    # auto with a budget too small for even one total: these layers are too narrow for a
    # sketch to pay (d / 8 < 8 rows), so it is refused up front, naming the options
    with pytest.raises(MemoryError, match="sketch=.*memory_budget="):
        NullSpaceProjector(model, memory_budget=TOTAL_FP32 - 1)


def test_observing_more_labels_than_an_explicit_per_label_budget_holds_stops_before_allocating():
    model, x, y = model_and_data(labels=10)
    budget = 2 * 6_400 + 36_864 + 100  # two labels at their peak, not three
    proj = NullSpaceProjector(model, statistics="per_label", memory_budget=budget)
    proj.collect(batches(x[y < 2], y[y < 2]))
    before = {k: proj.store.matrix(k, "0").clone() for k in proj.groups}
    with pytest.raises(MemoryError, match=r"new key\(s\) \[2\].*over memory_budget=.*nothing was observed"):
        proj.collect(batches(x[y == 2], y[y == 2]))
    assert sorted(proj.groups) == [0, 1]
    assert all(torch.equal(proj.store.matrix(k, "0"), m) for k, m in before.items())


BAD_LABELS = [
    (torch.tensor([0, 1, 2]), ValueError, "labels has 3 entries but the layer's input has batch size 2"),
    (torch.tensor([0]), ValueError, "labels has 1 entries but the layer's input has batch size 2"),
    (torch.tensor([0.0, 1.0]), TypeError, "labels must be an integer tensor"),
    (torch.tensor([[0, 1]]), ValueError, "labels must be a 1-D tensor"),
]


@pytest.mark.parametrize("labels, error, message", BAD_LABELS)
@pytest.mark.parametrize("policy, sketch", [("per_label", None), ("total", None), ("per_label", {"0": 4}),
                                            ("total", {"0": 4, "2": 4})])
def test_labels_are_checked_the_same_way_under_every_policy(policy, sketch, labels, error, message):
    """Issue 28.3: the total policy pools the labels, but a batch whose labels do not fit it is
    refused as under per-label (sketched layers included), and changes nothing."""
    model, x, _ = model_and_data(labels=3)
    proj = NullSpaceProjector(model, statistics=policy, sketch=sketch)
    with proj.observe(labels=torch.tensor([0, 1])):
        model(x[:2])
    before = proj.state_dict()
    sketched = {k: {n: [p.matrix().clone() for p in s.parts] for n, s in v.items()} for k, v in proj._sketches.items()}
    with pytest.raises(error, match=message):
        with proj.observe(labels=labels):
            model(x[:2])
    after = proj.state_dict()
    assert [g["key"] for g in after["groups"]] == [g["key"] for g in before["groups"]]
    for old, new in zip(before["groups"], after["groups"]):
        for name in old["covariances"]:
            assert torch.equal(old["covariances"][name], new["covariances"][name])
            assert int(old["counts"][name]) == int(new["counts"][name])
    assert proj._sketches.keys() == sketched.keys()
    for key, per_layer in sketched.items():
        for name, rows in per_layer.items():
            assert all(torch.equal(p.matrix(), r) for p, r in zip(proj._sketches[key][name].parts, rows, strict=True))
