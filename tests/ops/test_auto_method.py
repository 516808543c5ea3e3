"""``method="auto"``: which solver runs. Wide high-rank matrices go straight to the dense path
(the pilot's rank bound, ``randomized.sketch_cannot_fit``, so no sketch is drawn and wasted);
wide low-rank ones take the sketch; the pilot never turns away a sketch that would have fit."""
from __future__ import annotations

import pytest
import torch

from unsc_fast import ops
from unsc_fast.ops import dense, randomized, reference

from spectra import spectrum, uncentred_features, with_spectrum


def count_sketches(monkeypatch) -> list[int]:
    """Widths of the Gaussian sketches ``energy_bases`` draws."""
    widths = []
    draw = randomized.draw_sketch

    def counting(C, width, generator):
        widths.append(width)
        return draw(C, width, generator)

    monkeypatch.setattr(randomized, "draw_sketch", counting)
    return widths


def test_auto_runs_eigh_on_a_high_rank_matrix_without_a_sketch(monkeypatch):
    C = uncentred_features(520, 600)
    d = C.shape[0]
    k = reference.energy_basis_eigh(C, 0.99).shape[1]
    # The case is real: the rank overruns the budget, yet the plain effective rank is tiny.
    assert k > randomized.MAX_RANK_FRACTION * d
    effective_rank = float(C.diagonal().sum()) ** 2 / float(torch.linalg.vector_norm(C)) ** 2
    assert effective_rank < 0.05 * d
    sketches = count_sketches(monkeypatch)
    U = ops.energy_basis(C, 0.99, torch.Generator().manual_seed(0))
    assert sketches == []
    assert U.shape[1] == k


def no_dense_path(*args, **kwargs):
    raise AssertionError("the dense solver ran")


def test_auto_sketches_a_wide_low_rank_matrix(monkeypatch):
    C = with_spectrum(torch.exp(-torch.arange(600.0) / 15), torch.float32)  # k/d ~0.1 at 0.99
    k = reference.energy_basis_eigh(C, 0.99).shape[1]
    sketches = count_sketches(monkeypatch)
    monkeypatch.setattr(dense, "eigh_factors", no_dense_path)
    U = ops.energy_basis(C, 0.99, torch.Generator().manual_seed(0))
    assert sketches == [randomized.sketch_width(600, randomized.MAX_RANK_FRACTION)]  # fp64 dense: auto's fallback
    assert k <= U.shape[1] <= k + 2


def test_the_budget_follows_the_dense_path_auto_would_run(monkeypatch):
    """fp32 eigh would be the dense path for float32 below threshold 1 (off:
    dense.AUTO_TRIES_FP32), fp64 eigh otherwise; the sketch's budget is where it stops
    beating each."""
    monkeypatch.setattr(dense, "AUTO_TRIES_FP32", True)
    C = with_spectrum(torch.exp(-torch.arange(600.0) / 15), torch.float64)
    sketches = count_sketches(monkeypatch)
    monkeypatch.setattr(dense, "eigh_factors", no_dense_path)
    ops.energy_basis(C, 0.99, torch.Generator().manual_seed(0))
    ops.energy_basis(C.float(), 1.0, torch.Generator().manual_seed(0))
    assert sketches == [randomized.sketch_width(600, randomized.MAX_RANK_FRACTION)] * 2


@pytest.mark.parametrize("kind", ["exp", "power", "flat", "rank5", "uncentred"])
@pytest.mark.parametrize("threshold", [0.9, 0.97, 0.99])
def test_pilot_never_turns_away_a_sketch_that_fits(kind, threshold):
    """The pilot's bound is a guess where its Ritz values are off; wherever the budgeted
    sketch finds the basis, the guess must let it run."""
    C = uncentred_features(512, 900) if kind == "uncentred" else with_spectrum(spectrum(kind, 512), torch.float32)
    for fraction in (randomized.MAX_RANK_FRACTION_FP32, randomized.MAX_RANK_FRACTION):
        width = randomized.sketch_width(512, fraction)
        sketch = randomized.draw_sketch(C, width, torch.Generator().manual_seed(1))
        if randomized.energy_basis_randomized(C, threshold, sketch) is not None:
            assert not randomized.sketch_cannot_fit(C, threshold, width), (kind, threshold, fraction)


def test_pilot_draws_no_random_numbers():
    """Skipping a sketch must not shift the generator's stream for any other reason."""
    C = uncentred_features(520, 600)
    state = torch.random.get_rng_state()
    assert randomized.sketch_cannot_fit(C, 0.99, 130)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_pilot_leaves_threshold_one_to_the_sketch():
    """At threshold 1 the rank is the numerical rank, which the energy bound does not bound."""
    assert not randomized.sketch_cannot_fit(uncentred_features(520, 600), 1.0, 130)
