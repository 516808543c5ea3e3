"""UNSC across processes with ``torch.distributed``: pooled covariances, spread basis solves,
sharded weights.

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

The invariant behind repeated requests: the covariance of a label over the whole data is
the sum over ranks of what each rank stores. ``keep_covariances="rank0"`` keeps it by
moving every stored covariance onto rank 0 (the other ranks keep only bases);
``"none"`` drops them everywhere (a new request then needs a new pass over the data).

Sharded weights (FSDP2 ``fully_shard``): parameters and gradients are ``DTensor`` s sharded
along dim 0, the output rows. Projection acts on rows (``G - G U U^T``), so each rank
projects its own rows with the full basis and no communication.
"""
from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Iterable

import torch
import torch.distributed as dist
from torch import nn

from unsc_fast.bases import complement_if_cheaper, prefers_complement
from unsc_fast.build_checks import check_definite, subtracted_diagonal
from unsc_fast.distributed_pool import gather_covariances_on_rank0, keep_sketches_on_rank0
from unsc_fast.distributed_pool import pooled_covariance  # noqa: F401 - public here
from unsc_fast.store import CovarianceStore

if TYPE_CHECKING:  # pragma: no cover
    from unsc_fast.adapters import Slot

KEEP_COVARIANCES = ("all", "rank0", "none")
LOCAL = "local"
WRAPPER_PREFIX = "module."


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


def check_keep(keep_covariances: str) -> str:
    if keep_covariances not in KEEP_COVARIANCES:
        raise ValueError(f"keep_covariances must be one of {KEEP_COVARIANCES}, got {keep_covariances!r}")
    return keep_covariances


# ------------------------------------------------------------------ wrapped / sharded models
def _loaded(module_name: str):
    """A torch.distributed submodule if something already imported it, else None: a model
    cannot hold its objects otherwise, and importing it would cost every user seconds."""
    return sys.modules.get(module_name)


def check_model(model) -> None:
    """Refuse wrappers whose parameters are flattened: their weights are not (out, d) matrices."""
    fsdp = _loaded("torch.distributed.fsdp")  # never imported here: it costs seconds
    flat = [] if fsdp is None else [
        type(m).__name__ for m in model.modules() if isinstance(m, fsdp.FullyShardedDataParallel)
    ]
    if type(model).__name__ == "DeepSpeedEngine":
        flat.append("DeepSpeedEngine")
    if flat:
        raise NotImplementedError(
            f"{flat[0]} flattens parameters into 1-D buffers, which cannot be projected row by row. "
            "Shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead, or build the projector "
            "on the unwrapped model"
        )


def unprefixed_names(names, inner_names: Iterable[str]):
    """Module names as the user knows them: a DDP/DataParallel ``module.`` prefix is dropped
    (unless the prefixed name itself exists inside the wrapped model)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    inner = set(inner_names)
    return [n if n in inner or not n.startswith(WRAPPER_PREFIX) else n[len(WRAPPER_PREFIX):] for n in names]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DataParallel/DDP wrapper or a ``torch.compile`` module."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrappers):
        return model.module
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):  # torch.compile's OptimizedModule
        warnings.warn(
            "the model is compiled: hooks added after compilation do not fire in the compiled "
            "graph (pytorch#117758), so run the original module (model._orig_mod) inside "
            "observe(), or create the projector before compiling",
            UserWarning,
            stacklevel=3,
        )
        return original
    return model


def reshard(model) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state (local, no communication).

    After a forward without backward (as in ``observe()``) FSDP2 leaves the root module's
    weights gathered and registered as plain unsharded parameters; an optimizer created then
    would hold those instead of the sharded ones, and the wrapper would not find them.
    """
    fsdp = _loaded("torch.distributed.fsdp")
    if fsdp is None:  # nothing can be sharded by a module nobody imported
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def local_rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """The rows of a weight-shaped tensor this process holds: itself, or a DTensor's local
    shard (a view sharing its storage) when it is sharded along dim 0 or replicated."""
    dtensor = _loaded("torch.distributed.tensor")
    if dtensor is None or not isinstance(tensor, dtensor.DTensor):
        return tensor
    for placement in tensor.placements:
        if isinstance(placement, dtensor.Replicate) or (isinstance(placement, dtensor.Shard) and placement.dim == 0):
            continue
        raise NotImplementedError(
            f"layer {name!r}: DTensor placement {placement!r} is not supported; the null-space "
            "projection acts on output rows, so weights must be sharded along dim 0 (FSDP2's "
            "default Shard(0)) or replicated, and gradients reduced (no Partial)"
        )
    return tensor.to_local()


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

    Every rank must call it (through ``NullSpaceProjector.build``) with the same arguments.
    ``statistics``: the storage policy (one total: its forget passes are subtracted);
    ``sketches`` / ``sketch_rows``: the sketched slots' per-key sketches and rows, pooled
    by stacking (``unsc_fast.distributed_sketch``); ``class_sketches`` follow
    ``keep_covariances``.
    """
    from unsc_fast import distributed_sketch, sketch, solve
    from unsc_fast.statistics import is_forget_key

    sketches, sketch_rows, class_sketches = sketches or {}, sketch_rows or {}, class_sketches if class_sketches is not None else {}
    world, rank = dist.get_world_size(group), dist.get_rank(group)
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
    kept, subtracted = solve.request_keys(store, statistics, [k for k in union if not is_forget_key(k)],
                                          [k for k in union if is_forget_key(k)], exclude,
                                          set(include) if include is not None else None, subtract, allow_unobserved)
    energies = distributed_sketch.merged([entry["energies"] for entry in gathered])
    request = solve.sketch_keys(statistics, energies, kept, subtracted, exclude,
                                set(include) if include is not None else None, subtract)
    for name in sketch_rows:  # the same global numbers on every rank: the same decision
        solve.check_sketch_request(energies, name, request)

    names = list(slots)
    layers = [slots[name] for name in names]
    devices = [slot_devices[name] for name in names]
    counts = torch.tensor([sum(sketches[k][n].count for k in request.kept if n in sketches.get(k, {}))
                           if n in sketch_rows else sum(store.rows(k, n) for k in kept) for n in names], dtype=torch.int64)
    counts = counts.to(devices[0])
    dist.all_reduce(counts, group=group)
    empty = [n for n, c in zip(names, counts.tolist()) if c == 0]
    if empty:
        raise RuntimeError(
            f"layers {empty} saw no input on any rank in groups {kept}: did their forward run inside "
            "observe()? Leave them out with modules=[...] if the model never calls them"
        )

    removed = _pooled_subtracted_diagonals(store, names, layers, subtracted, devices[0], group)
    owners = _owners([layer.dim * layer.groups ** (1 / 3) if layer.kind != "diagonal" else 1 for layer in layers],
                     world)
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

    # Solve this rank's layers; a failure is shared so that no rank waits on a broadcast.
    solved: dict[int, torch.Tensor] = {}
    solved_complements: dict[int, torch.Tensor | None] = {}
    error = None
    try:
        for index in sorted(owned):
            if names[index] in sketch_rows:
                solved[index] = sketch.slot_basis([owned[index]], threshold, names[index], layers[index].kind == "grouped")
                continue
            if removed is not None:  # the pooled remainder must still be a covariance
                check_definite(names[index], owned[index], removed[index], subtracted, store.rounding)
            solved[index], complement = layers[index].solve_with_complement(owned[index], threshold, generator, method)
            if complement is not None and prefers_complement(solved[index].shape[-1], layers[index].dim):
                solved_complements[index] = complement  # else drop it now
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        error = exc
    owned.clear()
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
        dtype = torch.bool if layer.kind == "diagonal" else torch.float64 if name in sketch_rows else store.dtype
        if owners[index] == rank:
            basis = solved[index].to(devices[index]).contiguous()
        else:
            basis = torch.empty(_basis_shape(layer, k), dtype=dtype, device=devices[index])
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
                complement = torch.empty(layer.dim, layer.dim - k, dtype=dtype, device=devices[index])
            if complement.shape[1]:
                dist.broadcast(complement, src=source, group=group)
            complements[name] = complement

    if keep_covariances == "rank0":
        gather_covariances_on_rank0(store, layers, group, union, names, devices)
        for table, keys, rows in ((sketches, union, sketch_rows), (class_sketches, None, None)):
            keep_sketches_on_rank0(table, keys, rows, slots, slot_devices, group, rank)
    elif keep_covariances == "none":
        store.reset()
        sketches.clear()
        class_sketches.clear()
    return bases, complements, kept


def _pooled_subtracted_diagonals(store, names, slots, subtract, device, group) -> list | None:
    """Per slot, the diagonal of the ``subtract`` groups summed over every rank (one
    all-reduce), which ``build_checks.check_definite`` needs on the owner; None without subtract."""
    if not subtract:
        return None
    parts = [subtracted_diagonal(store, name, subtract, slot.shape, device) for name, slot in zip(names, slots)]
    flat = torch.cat([part.reshape(-1) for part in parts])
    dist.all_reduce(flat, group=group)
    return [piece.view(part.shape) for piece, part in zip(flat.split([p.numel() for p in parts]), parts)]


def _basis_shape(slot, k: int) -> tuple[int, ...]:
    if slot.kind == "diagonal":
        return (slot.dim,)
    if slot.kind == "grouped":
        return (slot.groups, slot.dim, k)
    return (slot.dim, k)
