"""Peak memory of the statistics policies against the number of labels and the layer width (issue 22).

Each configuration runs in a fresh interpreter whose peak resident set (``ru_maxrss`` of the
child, i.e. VmHWM) is its own, under an address-space cap (``--cap-gb``, default 12 GB as in
the issue; 0: none) set before torch is imported, so that the default budget
(``unsc_fast.statistics.memory``: 1/8 of the room under the cap) is the same from run to run whatever
else the machine is doing. A configuration is one observation of ``labels`` labels and one
class-wise request (forget label 0: ``build(exclude=(0,))``, after one pass over its forget
data when one total is kept). Reported: the policy the run ended with (``auto`` resolves to
one; a fold says so), class-sketch rows, peak RSS, peak above the interpreter after the model
and data were made, observe + build seconds (indicative: the machine is shared), and for the
Linear workloads the rank and the exact energy of the remaining rows the basis keeps
(``||X_r U||_F^2 / ||X_r||_F^2``). A policy that cannot fit is refused before allocating;
that shows as "refused".

Workloads:

* ``linear``: one ``Linear(d, 16)`` whose inputs span a 48-dimensional subspace (the issue's
  VGG-11 classifier case at d = 25,088), ``per_label`` samples per label;
* ``resnet18``: a CIFAR ResNet-18, 2 images per label (the issue's case).

Run (from the repository root)::

    python benchmarks/bench_memory.py --workload linear --widths 512 2048 8192 25088 32768 --labels 4
    python benchmarks/bench_memory.py --workload linear --widths 4096 --labels 1 10 100 1000
    python benchmarks/bench_memory.py --workload resnet18 --labels 1 10 100 1000 --policies auto
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

POLICIES = {"auto": {}, "per_label": {"statistics": "per_label"}, "total": {"statistics": "total"},
            "sketch": {"sketch": {"0": 256}}}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def linear_data(d: int, labels: int, per_label: int):
    import torch

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(48, d, generator=g) / 48**0.5
    n = labels * per_label
    x = torch.randn(n, 48, generator=g) @ basis  # rank 48, as in the issue
    return torch.nn.Sequential(torch.nn.Linear(d, 16)), x, torch.arange(n) % labels


def resnet_data(labels: int):
    import torch

    from unsc_fast.evaluation.models import ResNet18

    torch.manual_seed(0)
    x = torch.randn(2 * labels, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ResNet18(num_classes=max(labels, 2)).eval(), x, torch.arange(labels).repeat(2)


def run_one(workload: str, policy: str, d: int, labels: int, per_label: int, threshold: float) -> dict:
    import warnings

    import torch

    from unsc_fast import NullSpaceProjector

    model, x, y = linear_data(d, labels, per_label) if workload == "linear" else resnet_data(labels)
    baseline = rss_mb()
    start = time.perf_counter()
    kwargs = dict(POLICIES[policy])
    if workload == "resnet18" and "sketch" in kwargs:
        kwargs["sketch"] = {"features.6.1.residual_function.3": 256}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            proj = NullSpaceProjector(model, threshold=threshold, **kwargs)
            planned = (proj.statistics, proj.memory_budget)
            proj.collect([(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)])
            if proj.statistics == "total" and labels > 1:
                proj.collect([(x[y == 0], y[y == 0])], forget=True)
            proj.build(exclude=(0,) if labels > 1 else ())
        except MemoryError as error:
            return {"refused": str(error)[:160], "peak_mb": rss_mb(), "baseline_mb": baseline}
    result = {"planned": planned[0], "budget_mb": planned[1] / 2**20, "policy": proj.statistics,
              "folded": any("folded" in str(w.message) or "switched to" in str(w.message) for w in caught),
              "class_rows": proj._class_rows, "sketched": sorted(proj.sketch_rows),
              "seconds": time.perf_counter() - start, "baseline_mb": baseline, "peak_mb": rss_mb()}
    if workload == "linear":
        kept = x[y != 0] if labels > 1 else x
        U = proj.basis("0").double()
        result["rank"] = U.shape[1]
        result["energy"] = float((kept.double() @ U).square().sum() / kept.double().square().sum())
    return result


def child(args, workload: str, policy: str, d: int, labels: int) -> dict:
    command = [sys.executable, __file__, "--one", workload, policy, str(d), str(labels), "--per-label",
               str(args.per_label), "--threshold", str(args.threshold), "--cap-gb", str(args.cap_gb),
               "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"crashed": (out.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1])


def row(workload: str, policy: str, d: int, labels: int, r: dict) -> str:
    name = f"| {workload} | {d if workload == 'linear' else '-'} | {labels} | {policy} |"
    if "crashed" in r or "refused" in r:
        what = "crashed: " + r["crashed"] if "crashed" in r else "refused before allocating"
        return f"{name} {what} | | | {r.get('peak_mb', 0):.0f} | | | |"
    ended = r["policy"] + (" (folded)" if r["folded"] else "") + (f", sketched {len(r['sketched'])}" if r["sketched"] else "")
    extra = f"{r['rank']} | {r['energy']:.4f}" if "rank" in r else "- | -"
    return (f"{name} {ended} | {r['class_rows']} | {r['budget_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] - r['baseline_mb']:.0f} | {r['seconds']:.1f} | {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("linear", "resnet18"), default="linear")
    parser.add_argument("--widths", type=int, nargs="+", default=[4096])
    parser.add_argument("--labels", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--per-label", type=int, default=32, help="samples per label (linear)")
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each run (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=4, metavar=("WORKLOAD", "POLICY", "D", "LABELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.cap_gb > 0:
            cap = int(args.cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import torch

        torch.set_num_threads(args.threads)
        workload, policy, d, labels = args.one[0], args.one[1], int(args.one[2]), int(args.one[3])
        print(json.dumps(run_one(workload, policy, d, labels, args.per_label, args.threshold)))
        return
    import torch

    print(f"torch {torch.__version__}, python {platform.python_version()}, {args.threads} thread(s), "
          f"address-space cap {args.cap_gb or 'none'} GB, threshold {args.threshold}")
    print("| workload | d | labels | asked | ended as | class rows | budget MB | peak RSS MB | above baseline MB "
          "| observe + build s | rank | energy kept |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    widths = args.widths if args.workload == "linear" else [0]
    for d in widths:
        for labels in args.labels:
            for policy in args.policies:
                print(row(args.workload, policy, d, labels, child(args, args.workload, policy, d, labels)), flush=True)


if __name__ == "__main__":
    main()
