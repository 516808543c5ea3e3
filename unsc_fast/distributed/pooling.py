"""UNSC across processes with ``torch.distributed``: pooled covariances, spread basis solves.

Each rank observes its own shard of the remaining data. ``NullSpaceProjector.build`` then

1. checks, with one ``all_gather_object``, that every rank tracks the same layers (names,
   kinds, widths) and asks for the same build (threshold, dtype, exclude/include/subtract,
   ``keep_covariances``); a mismatch raises the same ``ValueError`` on every rank before any
   tensor collective could wait on a rank that went another way. The same exchange unions
   the observed labels, so a label seen on one rank only still takes part everywhere;
2. all-reduces the kept row counts (one int64 vector) and reduces each layer's kept
   covariance sum onto the rank that will solve it, layer by layer in the projector's fixed
   order (a rank without data for a layer sends zeros), so the sum over ranks equals the
   single-process covariance up to float summation order. The reduction happens once per
   build, never per batch, and costs one d x d matrix per layer whatever the number of labels;
3. solves each layer's basis on one rank (largest layers first, each to the least loaded
   rank, cost ~ d^3) and broadcasts it, so build time falls with more ranks and every rank
   ends with bitwise the same bases (and null-space complements).

Steps 1-2 are the statistics boundary (``pool_statistics``), step 3's broadcast the bases
boundary (``share_bases``); between them each rank solves its slots with the single-process
code (``solve.request.solve_slot``), which knows nothing of ranks.

The invariant behind repeated requests: the covariance of a label over the whole data is
the sum over ranks of what each rank stores. ``keep_covariances="rank0"`` keeps it by
moving every stored covariance onto rank 0 (the other ranks keep only bases);
``"none"`` drops them everywhere (a new request then needs a new pass over the data).

Sketched slots (``unsc_fast.statistics.sketch``) pool by stacking every rank's kept sketches
(``unsc_fast.distributed.sketch``); their per-key energies travel in step 1's exchange, so a
request a sketch cannot serve is refused alike on every rank. Under one total
(``statistics="total"``) the forget passes are subtracted, as on one process.

Sharded weights (FSDP2 ``fully_shard``) need no communication: each rank projects its own
rows with the full basis (``tracking.wrappers.local_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Iterable

import torch
import torch.distributed as dist

from unsc_fast.distributed import sketch as distributed_sketch
from unsc_fast.distributed.pool import gather_covariances_on_rank0, keep_sketches_on_rank0
from unsc_fast.solve import request as solve
from unsc_fast.solve.checks import Removal, check_definite, removal
from unsc_fast.solve.complement import complement_if_cheaper, prefers_complement
from unsc_fast.solve.request import solve_slot
from unsc_fast.statistics import sketch
from unsc_fast.statistics.policies import is_forget_key
from unsc_fast.statistics.store import CovarianceStore
from unsc_fast.tracking.layers import slot_devices, slot_named

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.adapters import Slot

LOCAL = "local"


# ------------------------------------------------------------------ process group
def resolve_group(process_group):
    """The group ``build`` pools over, or ``None`` for a build on this process's data alone.

    ``None`` follows ``torch.distributed``'s convention (the default group), but only when
    torch.distributed is initialised with more than one process: unchanged single-process
    code keeps working, and the same code under ``torchrun`` pools over all ranks.
    ``"local"`` never communicates. A ``ProcessGroup`` is used as given.
    """
    if isinstance(process_group, str):
        if process_group != LOCAL:
            raise ValueError(f"process_group must be a ProcessGroup, None or {LOCAL!r}, got {process_group!r}")
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if process_group is None:
            return None
        raise RuntimeError("build(process_group=...) was given a group but torch.distributed is not initialized")
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


# ------------------------------------------------------------------ build
def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is dist.group.WORLD else dist.get_global_rank(group, group_rank)


def _request(store: CovarianceStore, slots: dict, threshold, method, exclude, include, subtract, keep) -> dict:
    """What must be identical on every rank for the collectives below to line up."""
    keys = lambda values: None if values is None else sorted(repr(v) for v in values)  # noqa: E731
    return {
        "layers": [(name, slot.kind, slot.shape) for name, slot in slots.items()],
        "threshold": threshold,
        "method": method,
        "dtype": str(store.dtype),
        "exclude": keys(exclude),
        "include": keys(include),
        "subtract": keys(subtract),
        "keep_covariances": keep,
    }


def _check_same_request(requests: list[dict]) -> None:
    first = requests[0]
    for rank, request in enumerate(requests[1:], start=1):
        for field, value in request.items():
            if value == first[field]:
                continue
            if field == "layers":
                ours, theirs = {n: (k, d) for n, k, d in first[field]}, {n: (k, d) for n, k, d in value}
                detail = (
                    f"only on rank 0: {sorted(set(ours) - set(theirs))}, only on rank {rank}: "
                    f"{sorted(set(theirs) - set(ours))}, different width: "
                    f"{sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])}"
                    if ours != theirs
                    else "same layers in a different order"
                )
            else:
                detail = f"rank 0 has {first[field]!r}, rank {rank} has {value!r}"
            raise ValueError(
                f"build(): ranks disagree on {field} ({detail}). Every rank must track the same "
                "layers and call build() with the same arguments; nothing was communicated beyond "
                "this check"
            )


def _owners(dims: list[int], world: int) -> list[int]:
    """Layer -> solving rank: largest first, each to the least loaded rank (eigh ~ d^3)."""
    load, owners = [0] * world, [0] * len(dims)
    for index in sorted(range(len(dims)), key=lambda i: (-dims[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += dims[index] ** 3
    return owners


@dataclass
class PooledStatistics:
    """The statistics boundary's result on this rank: the request's kept keys, which rank
    solves each slot, and the pooled kept sums of the slots this rank solves."""

    group: object
    names: list[str]
    slots: list["Slot"]
    devices: list
    union: list  # every key observed on any rank
    kept: list
    subtracted: list  # the user's subtract and the forget passes inside the kept keys
    sketched: set  # slots whose pooled statistics are a sketch (solved from it, float64 bases)
    owners: list[int]  # slot index -> group rank that solves it
    owned: dict[int, torch.Tensor]  # slot index -> pooled kept sum (this rank's slots only)
    removed: list | None  # per slot, the pooled diagonal of the subtracted keys


def build(
    store: CovarianceStore,
    slots: dict[str, "Slot"],
    slot_devices: dict,
    group,
    *,
    exclude: set,
    include,
    subtract: set,
    threshold: float,
    generator: torch.Generator | None,
    method: str,
    keep_covariances: str,
    allow_unobserved: bool = False,
    statistics: str = "per_label",
    sketches: dict | None = None,
    sketch_rows: dict | None = None,
    class_sketches: dict | None = None,
) -> tuple[dict, dict, list]:
    """Pooled bases over ``group``: returns ``(bases, complements, kept)`` for the projector.

    The single-process solve with communication at its two boundaries: ``pool_statistics``
    sums the kept statistics onto the rank that solves each slot, that rank solves it as a
    single process would (``solve.request.solve_slot``, or the sketch's basis), and
    ``share_bases`` sends every basis to every rank. Every rank must call it (through
    ``NullSpaceProjector.build``) with the same arguments. ``statistics``: the storage policy
    (one total: its forget passes are subtracted); ``sketches`` / ``sketch_rows``: the
    sketched slots' per-key sketches and rows; ``class_sketches`` follow ``keep_covariances``.
    """
    sketches, sketch_rows = sketches if sketches is not None else {}, sketch_rows or {}
    class_sketches = class_sketches if class_sketches is not None else {}
    pooled = pool_statistics(store, slots, slot_devices, group, exclude=exclude, include=include, subtract=subtract,
                             threshold=threshold, method=method, keep_covariances=keep_covariances,
                             allow_unobserved=allow_unobserved, statistics=statistics, sketches=sketches,
                             sketch_rows=sketch_rows)
    # Solve this rank's slots; a failure is shared so that no rank waits on a broadcast.
    solved: dict[int, torch.Tensor] = {}
    solved_complements: dict[int, torch.Tensor] = {}
    error = None
    try:
        for index in sorted(pooled.owned):
            name = pooled.names[index]
            if name in pooled.sketched:
                solved[index] = sketch.slot_basis([pooled.owned[index]], threshold, name,
                                                  pooled.slots[index].kind == "grouped")
                continue
            if pooled.removed is not None:  # the pooled remainder must still be a covariance
                check_definite(name, pooled.owned[index], pooled.removed[index], pooled.subtracted, store.rounding)
            solved[index], complement = solve_slot(pooled.slots[index], pooled.owned[index], threshold, generator,
                                                   method)
            if complement is not None:
                solved_complements[index] = complement
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank by share_bases
        error = exc
    pooled.owned.clear()
    bases, complements = share_bases(pooled, solved, solved_complements, error, store.dtype)

    if keep_covariances == "rank0":
        gather_covariances_on_rank0(store, pooled.slots, group, pooled.union, pooled.names, pooled.devices)
        rank = dist.get_rank(group)
        for table, keys, rows in ((sketches, pooled.union, sketch_rows), (class_sketches, None, None)):
            keep_sketches_on_rank0(table, keys, rows, slots, slot_devices, group, rank)
    elif keep_covariances == "none":
        store.reset()
        sketches.clear()
        class_sketches.clear()
    return bases, complements, pooled.kept


def pool_statistics(store: CovarianceStore, slots: dict[str, "Slot"], slot_devices: dict, group, *, exclude: set,
                    include, subtract: set, threshold: float, method: str, keep_covariances: str,
                    allow_unobserved: bool, statistics: str = "per_label", sketches: dict | None = None,
                    sketch_rows: dict | None = None) -> PooledStatistics:
    """The statistics boundary: agree on the request, union the observed keys, check the
    pooled row counts, and reduce each slot's kept sum (a sketched slot: its stacked
    sketches) onto the rank that will solve it."""
    sketches, sketch_rows = sketches or {}, sketch_rows or {}
    world = dist.get_world_size(group)
    include = None if include is None else list(include)
    mine = {"request": _request(store, slots, threshold, method, exclude, include, subtract, keep_covariances),
            "groups": list(dict.fromkeys([*store.keys, *sketches])), "energies": distributed_sketch.summary(sketches),
            "statistics": statistics}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    _check_same_request([{**entry["request"], "statistics": entry["statistics"]} for entry in gathered])
    union = list(dict.fromkeys(key for entry in gathered for key in entry["groups"]))
    if not union:
        raise RuntimeError("build() needs observed data: no rank ran the model inside observe()")
    included = set(include) if include is not None else None
    kept, subtracted = solve.request_keys(store, statistics, [k for k in union if not is_forget_key(k)],
                                          [k for k in union if is_forget_key(k)], exclude, included, subtract,
                                          allow_unobserved)
    energies = distributed_sketch.merged([entry["energies"] for entry in gathered])
    request = solve.sketch_keys(statistics, energies, kept, subtracted, exclude, included, subtract)
    for name in sketch_rows:  # the same global numbers on every rank: the same decision
        solve.check_sketch_request(energies, name, request)

    names = list(slots)
    layers = [slots[name] for name in names]
    devices = [slot_devices[name] for name in names]
    counts = torch.tensor([sum(sketches[k][n].count for k in request.kept if n in sketches.get(k, {}))
                           if n in sketch_rows else sum(store.rows(k, n) for k in kept) for n in names],
                          dtype=torch.int64)
    counts = counts.to(devices[0])
    dist.all_reduce(counts, group=group)
    empty = [n for n, c in zip(names, counts.tolist()) if c == 0]
    if empty:
        raise RuntimeError(
            f"layers {empty} saw no input on any rank in groups {kept}: did their forward run inside "
            "observe()? Leave them out with modules=[...] if the model never calls them"
        )

    removed = pooled_removals(store, names, layers, kept, subtracted, devices[0], group)
    owners = _owners([layer.dim * layer.groups ** (1 / 3) if layer.kind != "diagonal" else 1 for layer in layers],
                     world)
    rank = dist.get_rank(group)
    owned: dict[int, torch.Tensor] = {}
    for index, name in enumerate(names):
        if name in sketch_rows:  # every rank gets the pooled sketch; its owner solves it
            parts = [sketches[k][name] for k in request.kept if name in sketches.get(k, {})]
            pooled = distributed_sketch.pool(parts, layers[index].groups, layers[index].dim, devices[index], group)
            if owners[index] == rank:
                owned[index] = pooled
            continue
        local = store.kept_sum(name, kept, subtracted, shape=layers[index].shape, device=devices[index], required=False)
        dist.reduce(local, dst=_global_rank(group, owners[index]), group=group)
        if owners[index] == rank:
            owned[index] = local
    return PooledStatistics(group, names, layers, devices, union, kept, subtracted, set(sketch_rows), owners, owned,
                            removed)


def share_bases(pooled: PooledStatistics, solved: dict, solved_complements: dict, error: Exception | None,
                dtype: torch.dtype) -> tuple[dict, dict]:
    """The bases boundary: re-raise a failed solve on every rank, then broadcast each slot's
    basis (and its complement where that is kept) from the rank that solved it."""
    group, names, layers, devices, owners = pooled.group, pooled.names, pooled.slots, pooled.devices, pooled.owners
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    status = torch.zeros(len(names) + 1, dtype=torch.int64, device=devices[0])
    for index, basis in solved.items():
        status[index] = basis.shape[-1]  # k (kmax for grouped); the width d for a diagonal mask
    status[-1] = int(error is not None)
    dist.all_reduce(status, group=group)
    if int(status[-1]):
        messages: list = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        if error is not None:
            raise error
        raise RuntimeError(f"build(): the basis solve failed on rank(s) {sorted(failed)}: {failed}")

    bases, complements = {}, {}
    for index, (name, layer) in enumerate(zip(names, layers)):
        k, source = int(status[index]), _global_rank(group, owners[index])
        own_dtype = torch.bool if layer.kind == "diagonal" else torch.float64 if name in pooled.sketched else dtype
        if owners[index] == rank:
            basis = solved[index].to(devices[index]).contiguous()
        else:
            basis = torch.empty(_basis_shape(layer, k), dtype=own_dtype, device=devices[index])
        if k:
            if basis.dtype == torch.bool:  # not every backend reduces or sends bool
                sent = basis.to(torch.uint8)
                dist.broadcast(sent, src=source, group=group)
                basis = sent.bool()
            else:
                dist.broadcast(basis, src=source, group=group)
        bases[name] = basis
        complements[name] = None
        if layer.kind == "dense" and prefers_complement(k, layer.dim):  # computed once, on the owner: bitwise equal everywhere
            if owners[index] == rank:
                complement = complement_if_cheaper(basis, solved_complements.pop(index, None))
            else:
                complement = torch.empty(layer.dim, layer.dim - k, dtype=own_dtype, device=devices[index])
            if complement.shape[1]:
                dist.broadcast(complement, src=source, group=group)
            complements[name] = complement
    return bases, complements


def pooled_removals(store: CovarianceStore, names: list, slots: list, kept: list, subtract: Iterable, device,
                    group) -> list | None:
    """``removal`` of every slot summed over the ranks of ``group`` (rows summed, the
    coarsest row dtype kept), which ``check_definite`` needs on the slot's owner; None
    without subtract."""
    if not subtract:
        return None
    parts = [removal(store, name, kept, subtract, slot.shape, device) for name, slot in zip(names, slots)]
    flat = torch.cat([part.diagonal.reshape(-1) for part in parts])
    rows = torch.tensor([part.rows for part in parts], dtype=torch.int64, device=device)
    eps = torch.tensor([part.row_eps for part in parts], dtype=torch.float64, device=device)
    dist.all_reduce(flat, group=group)
    dist.all_reduce(rows, group=group)
    dist.all_reduce(eps, op=dist.ReduceOp.MAX, group=group)
    pieces = flat.split([part.diagonal.numel() for part in parts])
    return [Removal(piece.view(part.diagonal.shape), int(n), float(e))
            for piece, part, n, e in zip(pieces, parts, rows.tolist(), eps.tolist())]


def _basis_shape(slot, k: int) -> tuple[int, ...]:
    if slot.kind == "diagonal":
        return (slot.dim,)
    if slot.kind == "grouped":
        return (slot.groups, slot.dim, k)
    return (slot.dim, k)


def pooled_covariance(projector, name: str, keys: Iterable[Hashable] | None = None, process_group=None) -> torch.Tensor:
    """Covariance of layer ``name`` of a ``NullSpaceProjector`` over ``keys`` summed over all
    ranks, bitwise the same on every rank (one all-reduce). Every rank must call it with the
    same arguments. Reads the projector's public state only (its layers, plan and store)."""
    group = resolve_group(process_group)
    slot = slot_named(projector.layers, projector.protection, name)
    request = (name, None if keys is None else sorted(repr(k) for k in keys))
    keys = projector.groups if keys is None else list(keys)  # absent keys add zeros on this rank
    if group is not None:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, request, group=group)
        if any(entry != request for entry in gathered):
            raise ValueError(f"pooled_covariance(): ranks asked for different (layer, keys): {gathered}")
    total = projector.store.kept_sum(slot.name, keys, shape=slot.shape, device=slot_devices(projector.protection)[slot.name],
                                     required=False)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total
