"""What stays where after a distributed build (``keep_covariances="rank0"``: every covariance
and sketch pooled onto rank 0): the part of ``unsc_fast.distributed`` that moves statistics
between ranks after the basis solve.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from unsc_fast.distributed import sketch as distributed_sketch
from unsc_fast.statistics.policies import is_forget_key
from unsc_fast.statistics.store import CovarianceStore


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is dist.group.WORLD else dist.get_global_rank(group, group_rank)


def gather_covariances_on_rank0(store: CovarianceStore, layers: list, group, keys: list, names: list,
                                 devices: list) -> None:
    """Move every stored covariance onto group rank 0, summed; the other ranks drop theirs.

    The pooled store is the sum over ranks either way, so later builds stay exact.
    """
    rank, root = dist.get_rank(group), _global_rank(group, 0)
    covariances, counts = {}, {}
    for key in keys:
        count = torch.tensor([store.rows(key, n) for n in names], dtype=torch.int64, device=devices[0])
        dist.all_reduce(count, group=group)  # everyone learns which layers have data for this key
        for index, name in enumerate(names):
            if not int(count[index]):
                continue
            local, _ = store.pop(key, name)
            local = (
                torch.zeros(layers[index].shape, dtype=store.dtype, device=devices[index])
                if local is None
                else local.to(devices[index])
            )
            dist.reduce(local, dst=root, group=group)
            if rank == 0:
                covariances.setdefault(key, {})[name] = local
                counts.setdefault(key, {})[name] = int(count[index])
    store.replace(covariances, counts)
    store.factor_([key for key in store.keys if is_forget_key(key)])  # pooled dense, kept as factors again


def keep_sketches_on_rank0(table: dict, keys, rows, slots: dict, devices: dict, group, rank: int) -> None:
    """Replace ``table`` (key -> slot -> sketch) by its pool on rank 0 (empty elsewhere)."""
    if keys is None:  # class sketches: their own keys, exchanged
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, [(k, {n: s.parts[0].l for n, s in per.items()}) for k, per in table.items()],
                               group=group)
        keys = list(dict.fromkeys(k for entry in gathered for k, _ in entry))
        rows = {n: l for entry in gathered for _, per in entry for n, l in per.items()}
    pooled = distributed_sketch.gather_on_rank0(table, {n: s for n, s in slots.items() if n in rows}, keys, rows,
                                                devices, group, rank)
    table.clear()
    table.update(pooled)

