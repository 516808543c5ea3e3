"""Statistics policies against the number of labels and the layer width (issue 13.2).

For one Linear layer of width d observed with ``labels`` labels x ``per_label`` samples, a
class-wise request (forget label 0) is served three ways, each in a fresh interpreter so
that its peak RSS (``ru_maxrss``) is its own:

* dense: ``statistics="per_label"``, fp32, one d x d matrix per label; ``build(exclude=(0,))``
* total: ``statistics="total"``, fp64, one total + one pass over the forget samples
* sketch: Frequent Directions, 256 rows, per label; ``build(exclude=(0,))``

Reported: time of observe + build, peak RSS above the interpreter's after import, and the
energy of the remaining rows that the basis keeps (exact, from the rows themselves:
``||X_r U||_F^2 / ||X_r||_F^2``). A configuration whose estimated statistics exceed
``--budget`` GB is not run and says so.

Run: python benchmarks/bench_statistics.py [--widths 4096 11008 25088] [--labels 1 10 100] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def run_one(policy: str, d: int, labels: int, per_label: int, threshold: float) -> dict:
    from torch import nn

    from unsc_fast import NullSpaceProjector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 4))
    n = labels * per_label
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.linspace(1.0, 0.05, d)  # an uneven spectrum
    y = torch.arange(n) % labels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    kwargs = {"per_label": {"statistics": "per_label"}, "total": {"statistics": "total"},
              "sketch": {"sketch": {"0": 256}}}[policy]
    proj = NullSpaceProjector(model, threshold=threshold, **kwargs)
    proj.collect([(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)])
    if policy == "total" and labels > 1:  # with one label there is nothing to forget
        proj.collect([(x[y == 0], y[y == 0])], forget=True)
    proj.build(exclude=(0,) if labels > 1 else (), generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    kept = x[y != 0] if labels > 1 else x
    U = proj.basis("0").double()
    energy = float((kept.double() @ U).square().sum() / kept.double().square().sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mb": (peak - base) / 1024, "energy": energy, "rank": U.shape[1]}


def estimate_gb(policy: str, d: int, labels: int) -> float:
    if policy == "per_label":
        return (labels + 2) * d * d * 4 / 2**30
    if policy == "total":
        return 4 * d * d * 8 / 2**30  # total, forget, one pending delta, the build's running sum
    return (labels + 1) * 2 * 256 * d * 8 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 11008, 25088])
    parser.add_argument("--labels", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--per-label", type=int, default=16, help="samples per label")
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--budget", type=float, default=4.0, help="GB; larger configurations are not run")
    parser.add_argument("--policies", nargs="+", default=["per_label", "total", "sketch"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--one", nargs=3, metavar=("POLICY", "D", "LABELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one:
        policy, d, labels = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_one(policy, d, labels, args.per_label, args.threshold)))
        return
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads")
    print("| d | labels | policy | est. statistics GB | observe + build s | peak RSS MB | rank | energy kept |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in args.widths:
        for labels in args.labels:
            for policy in args.policies:
                gb = estimate_gb(policy, d, labels)
                if gb > args.budget:
                    print(f"| {d} | {labels} | {policy} | {gb:.1f} | not run (over {args.budget} GB) | | | |", flush=True)
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--one", policy, str(d), str(labels), "--per-label",
                     str(args.per_label), "--threshold", str(args.threshold)]
                    + ([] if args.threads is None else ["--threads", str(args.threads)]),
                    capture_output=True, text=True, check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {d} | {labels} | {policy} | {gb:.2f} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                      f"{r['rank']} | {r['energy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
