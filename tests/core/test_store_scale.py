"""Done-means test of issue 13: observe 100 labels on a CIFAR ResNet-18 and 4 labels on a
25,088-wide Linear, serve a class-wise and a sample-wise request, with a peak RSS bounded
independently of the label count. Each workload runs in a fresh interpreter
(tests/core/scale_workload.py) so that ``ru_maxrss`` is its own."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 2**20


def run_workload(name):
    out = subprocess.run([sys.executable, os.path.join(HERE, "scale_workload.py"), name],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resnet18_100_labels_total_policy_peak_memory_does_not_grow_with_labels():
    r = run_workload("resnet")
    # Bound (no label count in it): the total, the forget pass, one batch's pending deltas and
    # the build's running sum are each at most one set of sum(d^2) matrices = total_bytes / 2
    # (the estimate counts total + forget), plus 512 MB for activations, the eigensolver and
    # the allocator. Measured 2026-11-24 on the loaded shared 2-core CPU: fp32 total 1,402 MB
    # above the interpreter against a 2,084 MB bound, 226 s wall / 90 s CPU (fp64 total:
    # 2,450 MB, 366 s); per-label storage would need 37 GB. Slow: the builds' energy bases
    # of the 2,304- and 4,608-wide layers dominate.
    one_matrix_set = r["total_bytes"] / 2 / MB
    bound = 4 * one_matrix_set + 512
    assert r["peak_mb"] - r["baseline_mb"] <= bound, r
    # per-label storage of the same 100 labels would need ~37 GB; the total keeps one fp64 set
    assert r["per_label_bytes"] > 15 * 2**30  # 100 fp32 matrix sets: ~37 GB
    assert r["stored_bytes"] <= r["total_bytes"]  # the total and the last forget pass


@pytest.mark.slow
def test_wide_linear_4_labels_is_sketched_and_stays_far_below_one_dense_matrix():
    r = run_workload("wide")
    # Bound: 4 labels x one 2 x 256 x 25,088 fp64 sketch (103 MB each), the build's SVD of the
    # stacked sketches (same size again) and 300 MB of slack; one dense fp32 25,088^2 matrix
    # alone is 2.5 GB
    sketch_mb = 2 * 256 * 25_088 * 8 / MB
    assert r["peak_mb"] - r["baseline_mb"] <= 2 * 4 * sketch_mb + 300, r
    assert r["peak_mb"] - r["baseline_mb"] < 25_088**2 * 4 / MB
    assert r["stored_bytes"] == 0  # no dense matrix at all


@pytest.mark.slow
def test_resnet18_100_labels_with_the_defaults_fits_2gb_under_a_12gb_cap():
    """Issue 22: died inside observation with per-label storage by default; now the default
    budget (1/8 of the room under the cap) keeps one total. Target: peak RSS under 2 GB."""
    r = run_workload("resnet_defaults")
    assert r["policy"] == "total", r
    assert r["peak_mb"] < 2048, r


@pytest.mark.slow
def test_wide_linear_4_labels_with_the_defaults_fits_3gb_and_keeps_the_inputs_rank():
    """Issue 22: Linear(25088) with 4 labels died allocating 2.5 GB; now sketched by default.
    Target: peak RSS under 3 GB, the basis of the 48-dimensional inputs keeping rank 40-48."""
    r = run_workload("wide_defaults")
    assert r["sketched"] == ["0"], r
    assert r["peak_mb"] < 3072, r
    assert 40 <= r["ranks"]["0"] <= 48, r
