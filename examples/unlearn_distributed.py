"""Forget one digit class with UNSC on several processes (DDP: gloo on CPU, NCCL on GPUs).

    torchrun --standalone --nproc_per_node=2 examples/unlearn_distributed.py

Every rank holds an equal shard of scikit-learn's bundled digits (no download). The ranks
train a small CNN together under DistributedDataParallel, then each observes the remaining
classes of its own shard; ``build`` sums the covariances over the ranks, solves each layer's
basis on one rank and broadcasts it, and ``unsc_fast.unlearn`` fine-tunes the DDP model on
every rank's forget samples with each weight change kept in the null space.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from unsc_fast import NullSpaceProjector
from unsc_fast.evaluation.data import class_mask, load_digits_split
from unsc_fast.training import make_loader
from unsc_fast.evaluation.models import DigitsCNN
from unsc_fast.evaluation.metrics import accuracy
from unsc_fast.unlearn import unlearn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="DDP training epochs before the request")
    parser.add_argument("--unlearn-epochs", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--keep-covariances", choices=("all", "rank0", "none"), default="rank0")
    return parser.parse_args()


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int):
    """Every ``world``-th sample, trimmed to equal sizes: DDP needs the same number of steps
    (and so of forwards) on every rank, or a collective waits forever."""
    usable = len(x) - len(x) % world
    return x[rank:usable:world], y[rank:usable:world]


def train(ddp: DistributedDataParallel, x, y, epochs: int, seed: int = 0) -> None:
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=5e-4)
    loader = make_loader(x, y, batch_size=32, shuffle=True, seed=seed)
    ddp.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(inputs), targets).backward()  # DDP averages gradients over ranks
            optimizer.step()
    ddp.eval()


def ranks_identical(model: torch.nn.Module) -> bool:
    """True when every rank holds bitwise the same parameters as rank 0."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    differing = (flat != reference).sum()
    dist.all_reduce(differing)
    return int(differing) == 0


def main() -> None:
    args = parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    say = print if rank == 0 else (lambda *_, **__: None)

    data = load_digits_split()
    x_train, y_train = shard(data.x_train, data.y_train, rank, world)
    torch.manual_seed(0)  # DDP also broadcasts rank 0's initial weights
    model = DigitsCNN(num_classes=data.num_classes).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    say(f"{world} ranks ({backend}), {len(x_train)} training samples each")

    started = time.perf_counter()
    train(ddp, x_train.to(device), y_train.to(device), args.epochs)
    say(f"trained in {time.perf_counter() - started:.1f} s")

    forget = class_mask(y_train, [args.forget_class])
    test_forget = class_mask(data.y_test, [args.forget_class])
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)

    def report(stage: str) -> None:  # rank 0 evaluates the plain module: no collective inside
        if rank == 0:
            remaining = accuracy(model, x_test[~test_forget], y_test[~test_forget])
            forgotten = accuracy(model, x_test[test_forget], y_test[test_forget])
            print(f"{stage:>7}: test accuracy remaining classes {remaining:5.1f} %, class {args.forget_class} {forgotten:5.1f} %")

    report("before")

    # Each rank observes the remaining classes of its own shard; build pools them over the ranks.
    projector = NullSpaceProjector(ddp, threshold=args.threshold)
    projector.collect(make_loader(x_train[~forget], y_train[~forget], batch_size=256), device=device)
    started = time.perf_counter()
    projector.build(keep_covariances=args.keep_covariances)
    say(f"projector built over {world} ranks in {time.perf_counter() - started:.3f} s; kept dims {projector.ranks()}")

    # Equal forget shards per rank, so every rank runs the same number of DDP steps.
    count = torch.tensor(int(forget.sum()), device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    x_forget, y_forget = x_train[forget][: int(count)], y_train[forget][: int(count)]
    result = unlearn(
        ddp, (x_forget.to(device), y_forget.to(device)), projector=projector,
        forget_classes=[args.forget_class], epochs=args.unlearn_epochs, lr=0.01,
    )
    say(f"unlearned on {int(count)} forget samples per rank in {result.seconds:.1f} s")
    report("after")
    identical = ranks_identical(model)
    say(f"ranks identical: {identical}")
    dist.barrier()  # no rank tears gloo down while a peer may still be talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
