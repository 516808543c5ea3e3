"""Projector ``build`` time over 1, 2, ... gloo processes on CPU: does spreading the per-layer
basis solves over the ranks pay for the covariance reduction and the broadcasts?

Every rank holds synthetic per-label covariances with the layer widths of a real model
(AllCNN or ResNet-18 on 32x32x3 inputs; a decaying spectrum, so the energy rank is a
fraction of d). World size 1 is the plain single-process build of the same data; larger
worlds reduce each layer's covariance onto its solving rank, solve, and broadcast. Each rank
uses ``--threads`` intra-op threads, so the comparison is per-core fair. Besides wall time it
reports the CPU time of the busiest rank (the critical path when every rank has its own
cores; on an oversubscribed machine wall time hides the split).

    python benchmarks/bench_distributed_build.py [--model allcnn|resnet18] [--ranks 1 2] [--quick]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from unsc_fast import NullSpaceProjector

# Input widths d of every tracked layer (conv: Cin * kh * kw).
MODELS = {
    "allcnn": [27, 864, 864, 864, 1728, 1728, 1728, 192, 192],
    "resnet18": [27] + [576] * 4 + [576, 1152, 1152, 1152, 64] + [1152, 2304, 2304, 2304, 128]
    + [2304, 4608, 4608, 4608, 256] + [512],
    "quick": [27, 288, 288, 576, 576, 64],
}
LABELS = 4


class Widths(nn.Module):
    """A stand-in model: one Linear per width (the projector only needs names and widths)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, 8, bias=False) for d in widths)


def synthetic_covariances(projector: NullSpaceProjector, rank: int, world: int, samples: int) -> None:
    """This rank's share of the same data for every world size: rows with a power-law
    spectrum (like activations), split by rank."""
    for index, (name, layer) in enumerate(projector.layers.items()):
        scales = torch.arange(1, layer.dim + 1, dtype=torch.float32).pow(-1.0)
        for label in range(LABELS):
            generator = torch.Generator().manual_seed(1000 * index + label)
            rows = (torch.randn(samples, layer.dim, generator=generator) * scales)[rank::world]
            projector.store.add(label, name, rows.T @ rows, len(rows))


def _rank_main(rank: int, world: int, init: str, args, results) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    projector = NullSpaceProjector(Widths(MODELS[args.model]), threshold=0.99)
    synthetic_covariances(projector, rank, world, args.samples)
    times, cpu_times = [], []
    for _ in range(args.repeat):
        if world > 1:
            dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        projector.build(exclude=(0,), generator=torch.Generator().manual_seed(0))
        cpu_times.append(time.process_time() - cpu_start)
        if world > 1:
            dist.barrier()  # the build is done when the slowest rank is done
        times.append(time.perf_counter() - start)
    results.put((rank, times, cpu_times, sum(projector.ranks().values())))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, args) -> tuple[float, float, int]:
    """Median wall time of a build, the median CPU time of its busiest rank, kept dims."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init = f"file://{tempfile.mkdtemp()}/rendezvous"
    processes = [context.Process(target=_rank_main, args=(r, world, init, args, results)) for r in range(world)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=1800) for _ in processes]
    for process in processes:
        process.join(60)
    outcomes.sort()
    busiest = max(statistics.median(cpu) for _, _, cpu, _ in outcomes)
    return statistics.median(outcomes[0][1]), busiest, outcomes[0][3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="allcnn")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=4096, help="rows per label over all ranks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.model, args.repeat, args.samples = "quick", 2, 1024
    widths = MODELS[args.model]
    print(f"# build of {args.model} ({len(widths)} layers, d = {min(widths)}..{max(widths)}), "
          f"{args.threads} thread(s) per rank, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'ranks':>5} | {'wall s':>7} | {'busiest rank CPU s':>18} | {'kept dims':>9} | {'wall speed-up':>13} | {'CPU speed-up':>12}")
    base = None
    for world in args.ranks:
        seconds, cpu, kept = measure(world, args)
        base = base or (seconds, cpu)
        print(f"{world:>5} | {seconds:7.3f} | {cpu:18.3f} | {kept:>9} | {base[0] / seconds:12.2f}x | {base[1] / cpu:11.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
