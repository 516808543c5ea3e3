"""Defaults that fit (issue 22): a budget read from the machine, labels folded into one total when
they outgrow it (nothing lost, no re-pass, a warning), class sketches beside the total with
``gram <= C_c`` and the exact trace, and ``class_statistics`` under every policy."""
import warnings

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.statistics import memory
from unsc_fast.statistics.policies import FORGET_KEY, TOTAL_KEY


def model_and_data(n=600, labels=12, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.arange(n) % labels
    return model, x, y


def by_label(x, y, labels):
    return [(x[y == c], y[y == c]) for c in labels]


def test_host_memory_is_the_least_of_meminfo_cgroup_and_address_space(monkeypatch):
    monkeypatch.setattr(memory, "_proc_field", lambda path, field: {"MemAvailable": 8 << 30, "VmSize": 1 << 30}[field])
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 6 << 30)
    monkeypatch.setattr(memory, "_address_space_room", lambda: None)
    assert memory.host_available() == 6 << 30
    monkeypatch.setattr(memory, "_address_space_room", lambda: 3 << 30)
    assert memory.host_available() == 3 << 30
    assert memory.default_budget(["cpu"]) == int(memory.DEFAULT_FRACTION * (3 << 30))


def test_address_space_room_reads_the_rlimit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (12 << 30, resource.RLIM_INFINITY))
    monkeypatch.setattr(memory, "_proc_field", lambda path, field: 2 << 30)
    assert memory._address_space_room() == 10 << 30


def test_the_default_budget_decides_and_an_explicit_policy_is_held_to_the_available_memory(monkeypatch):
    model, x, y = model_and_data()
    monkeypatch.setattr(memory, "available", lambda device: 10**9)
    proj = NullSpaceProjector(model)
    assert proj.memory_budget == int(memory.DEFAULT_FRACTION * 10**9) and proj.statistics == "per_label"
    # 4 MB available, a budget of 500 kB: one total (3.7 MB at its peak, the 288-wide solve
    # dominating) is over the budget but fits the machine; 12 labels per label (7.8 MB) do not
    monkeypatch.setattr(memory, "available", lambda device: 4_000_000)
    with pytest.warns(UserWarning) as caught:
        assert NullSpaceProjector(model, num_labels=12).statistics == "total"
    messages = " ".join(str(w.message) for w in caught)
    assert "exceeds the budget but fits the available memory" in messages
    assert "holds no class sketches" in messages and "falls back to the total's" in messages
    with pytest.raises(MemoryError, match=r"statistics=\"per_label\" for 12 label\(s\).*available memory of 4,000,000"):
        NullSpaceProjector(model, statistics="per_label", num_labels=12)


def fold_setup(labels_that_fit=4, class_rows=None):
    """A projector whose default budget holds ``labels_that_fit`` labels per label, no more."""
    model, x, y = model_and_data()
    probe = NullSpaceProjector(model)
    costs = probe._costs()
    budget = costs.per_label(labels_that_fit, 4) + 1
    return model, x, y, NullSpaceProjector(model, memory_budget=budget, class_rows=class_rows)


def test_labels_past_the_budget_fold_into_one_total_without_loss_and_say_so():
    model, x, y, proj = fold_setup()
    reference = NullSpaceProjector(model, statistics="per_label")  # the same fp32 sums, kept per label
    reference.collect(by_label(x, y, range(12)))
    with pytest.warns(UserWarning, match=r"folded the per-label statistics of 5 label\(s\) into one total.*"
                                         r"one pass over its forget data"):
        proj.collect(by_label(x, y, range(12)))
    assert proj.statistics == "total" and proj.groups == [TOTAL_KEY]
    for name in proj.layers:
        total = proj.store.matrix(TOTAL_KEY, name).double()
        expected = reference.covariance(name).double()
        assert (total - expected).abs().max() <= 1e-6 * expected.abs().max(), name  # fp32 sums, fp64 total
        assert proj.count(TOTAL_KEY, name) == sum(reference.count(k, name) for k in range(12))
    # a class-wise request from one pass over the forget data equals the per-label build
    proj.collect(by_label(x, y, [5]), forget=True)
    proj.build(exclude=(5,))
    reference.build(exclude=(5,))
    assert proj.ranks() == reference.ranks()
    for name in proj.layers:
        P, R = proj.basis(name).double(), reference.basis(name).double()
        assert (P @ P.T - R @ R.T).abs().max() < 1e-4, name


def test_a_first_batch_past_the_budget_switches_to_one_total_and_prices_it():
    """Nothing observed yet: the warning gives the total's estimated size, not its empty store's."""
    model, x, y, proj = fold_setup(labels_that_fit=2, class_rows=0)
    expected = proj.memory_estimate(1, dtype=torch.float32).total("total")
    with pytest.warns(UserWarning, match=rf"switched to one total \(float32, about {expected:,} bytes with a "
                                         r"forget pass and the build\)"):
        proj.collect([(x, y)])
    assert proj.statistics == "total"


@pytest.mark.parametrize("folded", [True, False])
def test_class_sketches_never_exceed_each_label_and_keep_its_exact_trace(folded):
    model, x, y = model_and_data()
    exact = NullSpaceProjector(model, statistics="per_label", dtype=torch.float64)
    exact.collect(by_label(x, y, range(12)))
    if folded:  # per-label matrices turned into class sketches (Nystrom)
        _, _, _, proj = fold_setup(class_rows=6)
        with pytest.warns(UserWarning, match="folded"):
            proj.collect(by_label(x, y, range(12)))
    else:  # one total from the start: class sketches fed from the rows (Frequent Directions)
        proj = NullSpaceProjector(model, statistics="total", class_rows=6)
        proj.collect([(x[:300], y[:300]), (x[300:], y[300:])])
    proj.build()
    for name in proj.layers:
        U = proj.basis(name).double()
        seen = []
        for statistic in proj.class_statistics(name):
            key, trace, gram = statistic
            seen.append(key)
            C = exact.store.matrix(key, name)
            assert not statistic.exact and gram.dtype == torch.float64 and gram.shape == C.shape
            assert trace == pytest.approx(C.trace().item(), rel=1e-6)  # fp32 rows summed in fp64
            assert torch.linalg.eigvalsh(C - gram)[0] >= -1e-6 * trace  # gram <= C_c (to fp32 rounding)
            lower, true = statistic.captured(U), (U.T @ C @ U).trace().item()
            assert lower <= true + 1e-6 * trace
            assert 0 < statistic.sketched_energy <= 1 + 1e-6
        assert sorted(seen) == list(range(12))


def test_class_statistics_are_exact_per_label_and_take_off_a_labels_forget_pass():
    model, x, y = model_and_data()
    proj = NullSpaceProjector(model, statistics="per_label", dtype=torch.float64)
    proj.collect(by_label(x, y, range(12)))
    forget = (y == 3) & (torch.arange(len(y)) < 200)
    proj.collect([(x[forget], y[forget])], forget=True)
    stats = {s.key: s for s in proj.class_statistics("3", keys=[2, 3])}
    assert stats[2].exact and torch.equal(stats[2].gram, proj.store.matrix(2, "3"))
    remaining = proj.store.matrix(3, "3") - proj.store.matrix((FORGET_KEY, 3), "3")
    assert torch.equal(stats[3].gram, remaining) and stats[3].trace == pytest.approx(remaining.trace().item())
    assert stats[3].captured(torch.eye(288, dtype=torch.float64)) == pytest.approx(stats[3].trace)


def test_class_statistics_say_why_they_cannot_be_served():
    model, x, y = model_and_data()
    proj = NullSpaceProjector(model, statistics="total", class_rows=0)
    proj.collect(by_label(x, y, range(12)))
    with pytest.raises(LookupError, match="without class sketches"):
        next(proj.class_statistics("0"))
    sketched = NullSpaceProjector(model, statistics="total", class_rows=4)
    sketched.collect(by_label(x, y, range(12)))
    sketched.collect([(x[:7], y[:7])], forget=True)  # a labelled sample-wise forget pass
    with pytest.raises(LookupError, match="label 3 has rows in the forget pass"):
        list(sketched.class_statistics("0", keys=[3]))
    list(sketched.class_statistics("0", keys=[9]))  # untouched labels still served
    with pytest.raises(LookupError, match="label 99 has no statistics"):
        next(sketched.class_statistics("0", keys=[99]))
    embedding = NullSpaceProjector(nn.Sequential(nn.Embedding(10, 3)))
    with pytest.raises(ValueError, match="diagonal"):
        next(embedding.class_statistics("0"))


def test_class_sketches_shrink_then_drop_as_labels_keep_arriving():
    model, x, y = model_and_data(labels=12)
    proj = NullSpaceProjector(model, statistics="total", num_labels=2)
    costs = proj._costs()
    # room for 2 labels x 16 rows beside the total; later labels force fewer rows, then none
    budget = costs.total(2, 8) + 16 * costs.class_row_bytes(2)
    proj = NullSpaceProjector(model, statistics="total", num_labels=2, memory_budget=budget)
    assert proj._class_rows == 16
    proj.collect(by_label(x, y, [0, 1]))
    with pytest.warns(UserWarning, match="shrunk from 16 to 5 rows"):  # the third label: room for six at 5 rows
        proj.collect(by_label(x, y, [2, 3, 4]))
    assert proj._class_rows == 5
    assert all(s.parts[0].matrix().shape[0] <= proj._class_rows for per in proj._class_sketches.values()
               for s in per.values())
    with pytest.warns(UserWarning, match="dropped"):
        proj.collect(by_label(x, y, range(5, 12)))
    assert proj._class_rows == 0 and not proj._class_sketches


def test_a_fold_keeps_the_budget_and_observes_nothing_twice():
    """The fold happens before the batch that would not fit; that batch goes into the total."""
    model, x, y, proj = fold_setup(labels_that_fit=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(12):
            proj.collect(by_label(x, y, [c]))
    assert proj.count(TOTAL_KEY, "3") == len(y)  # every sample once
    assert proj.store.nbytes() + sum(s.nbytes for per in proj._class_sketches.values() for s in per.values()) \
        <= proj.memory_budget
