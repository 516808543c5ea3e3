"""Sketches across processes: Frequent Directions sketches merge by stacking (``unsc_fast.statistics.sketch``),
so the pooled sketch of a slot is every rank's kept sketches stacked, with the energies summed.

``pool`` runs on every rank in the same order (the slots in the projector's order): one
all-gather of the row counts and one of the zero-padded rows per group, one all-reduce of the
energies; every rank ends with the same pooled sketch. ``summary`` / ``merged`` carry each
(key, slot)'s energy in the build's object exchange, so that the checks a sketch request
needs (``solve.request.check_sketch_request``) read the same global numbers on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from unsc_fast.statistics import class_statistics as per_class
from unsc_fast.statistics import policies
from unsc_fast.statistics.sketch import FrequentDirections, SlotSketch


def summary(sketches: dict) -> dict:
    """``{key: {slot: energy}}`` of this rank's sketches (plain floats: exchanged as objects)."""
    return {key: {slot: sketch.trace for slot, sketch in per_key.items()} for key, per_key in sketches.items()}


def merged(summaries: list[dict]) -> dict:
    """The ranks' summaries summed per (key, slot), keys in first-seen order."""
    total: dict = {}
    for entry in summaries:
        for key, per_slot in entry.items():
            for slot, energy in per_slot.items():
                total.setdefault(key, {})[slot] = total.get(key, {}).get(slot, 0.0) + energy
    return total


def _gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``(n_r, d)`` rows stacked in rank order (n_r may differ, 0 included)."""
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c) for c in counts)
    padded = rows.new_zeros((longest, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[: int(n)] for part, n in zip(gathered, counts)])


def pool(parts: list[SlotSketch], groups: int, dim: int, device, group) -> SlotSketch:
    """The sum over ranks of this rank's ``parts`` (its kept keys' sketches of one slot)."""
    pooled = []
    for index in range(groups):
        local = [p.parts[index] for p in parts]
        rows = torch.cat([p.matrix().to(device, torch.float64) for p in local]) if local else \
            torch.zeros(0, dim, dtype=torch.float64, device=device)
        numbers = torch.tensor([sum(p.trace for p in local), sum(p.shrunk for p in local),
                                float(sum(p.count for p in local))], dtype=torch.float64, device=device)
        dist.all_reduce(numbers, group=group)
        stacked = _gather_rows(rows, group)
        sketch = FrequentDirections(dim, max(1, stacked.shape[0]), torch.float64, device, stacked.shape[0] + 1)
        sketch.rows, sketch.trace, sketch.shrunk, sketch.count = stacked, float(numbers[0]), float(numbers[1]), int(numbers[2])
        pooled.append(sketch)
    return SlotSketch.of(pooled)


def gather_on_rank0(sketches: dict, slots: dict, keys: list, rows: dict, devices: dict, group, rank: int) -> dict:
    """Every (key, slot) sketch pooled onto group rank 0 (``keep_covariances="rank0"``), shrunk
    back to ``rows[slot]`` rows; the other ranks keep none. ``keys``: the union over ranks,
    the same order everywhere."""
    kept: dict = {}
    for key in keys:
        for name, slot in slots.items():
            present = torch.tensor([int(name in sketches.get(key, {}))], device=devices[name])
            dist.all_reduce(present, group=group)
            if not int(present):
                continue
            mine = [sketches[key][name]] if name in sketches.get(key, {}) else []
            pooled = pool(mine, slot.groups, slot.dim, devices[name], group)
            if rank == 0:
                pooled.resize(rows[name])
                kept.setdefault(key, {})[name] = pooled
    return kept


def pooled_class_statistics(projector, slot, keys, group):
    """``class_statistics`` over every rank (every rank calls it with the same arguments): the
    labels are the union over the ranks, each label's exact matrix summed (one all-reduce) or
    its sketches stacked (``pool``); a refusal (a sketch a forget pass touched on any rank) is
    decided from the union too, so that every rank raises at the same label."""
    name, sketched = slot.name, slot.name in projector._sketch_slots
    refused = ([k for k in projector.class_keys if name in projector._sketches.get((policies.FORGET_KEY, k), {})]
               if sketched else list(projector._forget_labels) if projector.statistics == "total" else [])
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (projector.class_keys, refused), group=group)
    union = list(dict.fromkeys(k for labels, _ in gathered for k in labels)) if keys is None else list(keys)
    refused = {k for _, ranks_refused in gathered for k in ranks_refused}
    device = projector._slot_devices[name]
    for key in union:
        if key in refused:
            raise LookupError(f"slot {name!r}: label {key!r} has rows in a forget pass on some rank, and its sketch "
                              "cannot be reduced by them; call reset_forget() first")
        if projector.statistics == "per_label" and not sketched:
            local = per_class._exact(projector.store, key, name)
            matrix = local.matrix if local is not None else torch.zeros(slot.shape, dtype=torch.float64, device=device)
            dist.all_reduce(matrix, group=group)
            trace = matrix.diagonal(dim1=-2, dim2=-1).sum(-1)
            yield per_class.ClassStatistic(key, name, float(trace) if trace.dim() == 0 else trace, True, matrix=matrix)
            continue
        table = projector._sketches if sketched else projector._class_sketches
        mine = table.get(key, {}).get(name)
        yield per_class._from_sketch(key, name, pool([mine] if mine is not None else [], slot.groups, slot.dim,
                                                     device, group))
