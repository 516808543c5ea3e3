"""Two gloo processes on CPU: pooled bases, DDP and FSDP2 training, config mismatches, torchrun.

Every scenario runs in 2 forked processes (no second import of torch: each test takes a
second or two) that meet through a ``file://`` rendezvous in the test's tmp dir. Every
collective has a 30 s timeout and the parent kills the children after ``JOIN_TIMEOUT``, so a
hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast import distributed as unsc_distributed

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

WORLD = 2
JOIN_TIMEOUT = 60.0
COLLECTIVE_TIMEOUT = timedelta(seconds=30)
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- harness
def _worker(scenario, rank: int, world: int, init_method: str, out_dir: str, status) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        result = scenario(rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        status.put((rank, None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        status.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(scenario, tmp_path: Path, world: int = WORLD) -> list:
    """Run ``scenario(rank, world)`` on ``world`` gloo processes; their results, by rank."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    status = context.Queue()
    init_method = f"file://{tmp_path / 'rendezvous'}"
    processes = [
        context.Process(target=_worker, args=(scenario, rank, world, init_method, str(tmp_path), status), daemon=True)
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    errors = {}
    try:
        for _ in range(world):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            rank, error = status.get(timeout=remaining)
            if error is not None:
                errors[rank] = error
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    except Exception:  # queue.Empty or TimeoutError: a rank hung
        pytest.fail(f"ranks did not finish within {JOIN_TIMEOUT:.0f} s (a collective hung?)")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    if errors:
        pytest.fail("\n".join(f"rank {rank} failed:\n{text}" for rank, text in sorted(errors.items())))
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


# ----------------------------------------------------------------------------- shared pieces
class SmallNet(nn.Module):
    """Conv (odd out-channel count: uneven FSDP2 shards) -> Linear -> Linear, and a side Linear
    that runs only when ``use_side`` is set (a layer one rank never sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.hidden = nn.Linear(5 * 4 * 4, 7)
        self.head = nn.Linear(7, 4)
        self.side = nn.Linear(7, 4)
        self.use_side = True

    def forward(self, x):
        h = torch.relu(self.hidden(torch.relu(self.conv(x)).flatten(1)))
        out = self.head(h)
        return out + self.side(h) if self.use_side else out


def make_data(n: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=generator)
    y = torch.arange(n) % 4
    return x, y


def make_model(seed: int = 0, side: bool = True) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet()
    if not side:  # DDP/FSDP2 would wait for gradients of a layer that never runs
        del model.side
        model.use_side = False
    return model


def halves(x, y, rank: int, world: int):
    """Contiguous equal shards: every rank holds every label."""
    size = len(x) // world
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def observe_batches(projector: NullSpaceProjector, model: SmallNet, x, y, batch: int = 8, side_every: int = 2):
    """Observe in batches; the side layer runs on every ``side_every``-th batch (0: never)."""
    with torch.no_grad():
        for step, start in enumerate(range(0, len(x), batch)):
            model.use_side = bool(side_every) and step % side_every == 0
            with projector.observe(labels=y[start : start + batch]):
                model(x[start : start + batch])
    model.use_side = True


def projection_matrices(projector: NullSpaceProjector) -> dict:
    """U U^T per layer: comparable across solvers whatever the eigenvectors' signs."""
    return {name: projector.basis(name) @ projector.basis(name).mT for name in projector.layers}


def _uneven_shards(x, y, rank: int):
    """Rank 0 gets 30 samples with every label; rank 1 gets 18 without label 3."""
    first = torch.arange(30)
    rest = torch.arange(30, len(x))
    rest = rest[y[rest] != 3]
    index = first if rank == 0 else rest
    return x[index], y[index], torch.cat([first, rest])


# ----------------------------------------------------------------------------- 1. pooled bases
def _pooled_scenario(rank: int, world: int) -> dict:
    x, y = make_data()
    model = make_model()
    x_local, y_local, union = _uneven_shards(x, y, rank)
    pooled = NullSpaceProjector(model, threshold=0.95)
    # Rank 1 never runs the side layer; rank 0 runs it on every other batch.
    observe_batches(pooled, model, x_local, y_local, side_every=2 if rank == 0 else 0)
    pooled.build(exclude=(2,))

    single = NullSpaceProjector(model, threshold=0.95)  # one process, all the data, same batches
    observe_batches(single, model, x[union[:30]], y[union[:30]], side_every=2)
    observe_batches(single, model, x[union[30:]], y[union[30:]], side_every=0)
    single.build(exclude=(2,), process_group="local")

    local = NullSpaceProjector(model, threshold=0.95)
    observe_batches(local, model, x_local, y_local, side_every=2 if rank == 0 else 0)
    if rank == 0:  # rank 1 alone never saw the side layer
        local.build(exclude=(2,), process_group="local")

    result = {
        "built_from": pooled.built_from,
        "bases": {n: pooled.basis(n).clone() for n in pooled.layers},
        "pooled_covariance": unsc_distributed.pooled_covariance(pooled, "conv", keys=[0, 1, 3]),
        "single_covariance": single.covariance("conv", keys=[0, 1, 3]),
        "projections": projection_matrices(pooled),
        "single_projections": projection_matrices(single),
        "single_ranks": single.ranks(),
        "ranks": pooled.ranks(),
        "local_projections": projection_matrices(local) if rank == 0 else None,
    }

    # Repeated request after moving every covariance onto rank 0 (others keep only bases).
    pooled.build(exclude=(2,), keep_covariances="rank0")
    result["groups_after_rank0"] = pooled.groups
    pooled.build(exclude=(1, 3))
    single.build(exclude=(1, 3), process_group="local")
    result["second_projections"] = projection_matrices(pooled)
    result["second_single_projections"] = projection_matrices(single)
    return result


def test_pooled_bases_match_single_process(tmp_path):
    results = run_ranks(_pooled_scenario, tmp_path)
    first, second = results
    assert first["built_from"] == second["built_from"] == (0, 1, 3)  # label 3 seen on rank 0 only
    for name in first["bases"]:
        assert torch.equal(first["bases"][name], second["bases"][name]), name  # bitwise across ranks
    assert torch.equal(first["pooled_covariance"], second["pooled_covariance"])
    scale = first["single_covariance"].abs().max()
    assert (first["pooled_covariance"] - first["single_covariance"]).abs().max() <= 3e-7 * scale
    assert first["ranks"] == first["single_ranks"]
    for name, expected in first["single_projections"].items():
        torch.testing.assert_close(first["projections"][name], expected, atol=1e-5, rtol=0)
    assert any(  # a rank's own data alone gives other bases: the pooling matters
        not torch.allclose(first["local_projections"][n], first["projections"][n], atol=1e-3)
        for n in first["projections"]
    )
    assert set(first["groups_after_rank0"]) == {0, 1, 2, 3} and second["groups_after_rank0"] == []
    for name, expected in first["second_single_projections"].items():
        for result in results:
            torch.testing.assert_close(result["second_projections"][name], expected, atol=1e-5, rtol=0)


def _forget_pass_scenario(rank: int, world: int) -> dict:
    """One total per rank and a small forget pass on rank 0 (kept as a factor where its rows are
    few): the pooled request equals one process's, and after ``keep_covariances="rank0"`` the
    pooled forget pass is a factor again and serves the next request alike."""
    x, y = make_data()
    forget = torch.tensor([2])  # one sample of label 2: one row of 'hidden' (d = 80), 16 of 'conv' (d = 18)

    def projector():
        return NullSpaceProjector(make_model(), threshold=0.95, statistics="total", dtype=torch.float32)

    pooled, single = projector(), projector()
    x_local, y_local = halves(x, y, rank, world)
    observe_batches(pooled, pooled.model, x_local, y_local, side_every=1)
    observe_batches(single, single.model, x, y, side_every=1)
    for proj in (single, pooled) if rank == 0 else (single,):
        with torch.no_grad(), proj.observe(labels=y[forget], forget=True):
            proj.model(x[forget])
    local_factored = {n: pooled.store.factored("forget", n) for n in pooled.layers}
    pooled.build()
    single.build(process_group="local")
    result = {"factored": local_factored, "projections": projection_matrices(pooled),
              "single_projections": projection_matrices(single)}
    pooled.build(keep_covariances="rank0")
    result["pooled_factored"] = {n: pooled.store.factored("forget", n) for n in pooled.layers}
    pooled.build(threshold=0.9)
    single.build(threshold=0.9, process_group="local")
    result["second_projections"] = projection_matrices(pooled)
    result["second_single_projections"] = projection_matrices(single)
    return result


def test_a_forget_pass_pooled_across_ranks_stays_factored_and_subtracts_alike(tmp_path):
    first, second = run_ranks(_forget_pass_scenario, tmp_path)
    assert first["factored"] == {"conv": False, "hidden": True, "head": True, "side": True}
    assert first["pooled_factored"] == first["factored"] and not any(second["pooled_factored"].values())
    for result in (first, second):
        for stage in ("", "second_"):
            for name, expected in result[f"{stage}single_projections"].items():
                torch.testing.assert_close(result[f"{stage}projections"][name], expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 2. DDP
def _ddp_scenario(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    x, y = make_data(64)
    model = make_model(side=False)
    ddp = DistributedDataParallel(model)
    # Names as the user knows them: with and without DDP's "module." prefix.
    projector = NullSpaceProjector(ddp, threshold=0.9, modules=["module.conv", "hidden", "module.head"])
    assert list(projector.layers) == ["conv", "hidden", "head"]
    x_local, y_local = halves(x, y, rank, world)
    with torch.no_grad(), projector.observe(labels=y_local[y_local != 0]):
        ddp(x_local[y_local != 0])  # hooks on ddp.module fire through DDP's forward
    projector.build()  # class 0 was never observed: nothing to exclude
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1), projector)
    forget_x, forget_y = x_local[y_local == 0], (y_local[y_local == 0] + 1) % 4
    worst = 0.0
    for _ in range(4):
        before = {n: layer.weight.detach().clone() for n, layer in projector.layers.items()}
        optimizer.zero_grad()
        F.cross_entropy(ddp(forget_x), forget_y).backward()
        optimizer.step()
        for name, layer in projector.layers.items():
            change = layer.matrix(layer.weight.detach() - before[name])
            worst = max(worst, float((change @ projector.basis(name)).abs().max()))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "worst": worst,
            "bases": {n: projector.basis(n) for n in projector.layers}}


def test_ddp_training_keeps_ranks_identical_and_in_null_space(tmp_path):
    first, second = run_ranks(_ddp_scenario, tmp_path)
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name
    assert first["worst"] < 1e-5 and second["worst"] < 1e-5
    initial = dict(make_model(side=False).named_parameters())
    assert not torch.equal(first["params"]["hidden.weight"], initial["hidden.weight"])  # it did train
    assert torch.equal(first["params"]["hidden.bias"], initial["hidden.bias"])  # untracked: frozen


# ----------------------------------------------------------------------------- 3. FSDP2
def _fsdp2_scenario(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    x, y = make_data(64)
    reference = make_model(side=False)
    sharded = copy.deepcopy(reference)
    fully_shard(sharded.conv)
    fully_shard(sharded.hidden)
    fully_shard(sharded)
    assert isinstance(sharded.conv.weight, DTensor) and sharded.conv.weight.to_local().shape[0] == (3 if rank == 0 else 2)

    projector = NullSpaceProjector(sharded, threshold=0.9)
    x_local, y_local = halves(x, y, rank, world)
    with torch.no_grad(), projector.observe(labels=y_local[y_local != 0]):
        sharded(x_local[y_local != 0])
    projector.build()  # class 0 was never observed: nothing to exclude
    single = NullSpaceProjector(reference, threshold=0.9)
    with torch.no_grad(), single.observe(labels=y[y != 0]):
        reference(x[y != 0])
    single.build(process_group="local")

    inner = lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)  # noqa: E731
    optimizer = NullSpaceOptimizer(inner(sharded), projector)
    reference_optimizer = NullSpaceOptimizer(inner(reference), single)
    shards = [halves(x, y, r, world) for r in range(world)]
    forget = [(fx[fy == 0], (fy[fy == 0] + 1) % 4) for fx, fy in shards]
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(sharded(forget[rank][0]), forget[rank][1]).backward()  # grads: mean over ranks
        optimizer.step()
        reference_optimizer.zero_grad()
        losses = [F.cross_entropy(reference(fx), fy) for fx, fy in forget]
        (sum(losses) / world).backward()
        reference_optimizer.step()

    # A weight sharded along its input dim cannot be projected row by row.
    mesh = sharded.conv.weight.device_mesh
    column_sharded = distribute_tensor(torch.zeros(7, 80), mesh, [Shard(1)])
    try:
        projector.project_tensor_("hidden", column_sharded)
        column_error = None
    except NotImplementedError as error:
        column_error = str(error)
    return {
        "sharded": {n: p.full_tensor().detach().clone() for n, p in sharded.named_parameters()},
        "reference": {n: p.detach().clone() for n, p in reference.named_parameters()},
        "initial": {n: p.detach().clone() for n, p in make_model(side=False).named_parameters()},
        "column_error": column_error,
    }


def test_fsdp2_training_matches_unsharded(tmp_path):
    for result in run_ranks(_fsdp2_scenario, tmp_path):
        for name, expected in result["reference"].items():
            torch.testing.assert_close(result["sharded"][name], expected, atol=1e-5, rtol=1e-5, msg=name)
        assert not torch.equal(result["sharded"]["conv.weight"], result["initial"]["conv.weight"])
        assert "Shard(dim=1)" in result["column_error"]


# ----------------------------------------------------------------------------- 4. mismatches
def _mismatch_scenario(rank: int, world: int) -> dict:
    x, y = make_data()
    model = make_model()
    errors = {}
    attempts = {
        "threshold": lambda: (NullSpaceProjector(model, threshold=0.9 if rank == 0 else 0.99), {}),
        "layers": lambda: (NullSpaceProjector(model, modules=["conv", "hidden"] if rank == 0 else ["conv"]), {}),
        "exclude": lambda: (NullSpaceProjector(model), {"exclude": (1,) if rank == 0 else (2,)}),
        "method": lambda: (NullSpaceProjector(model), {"method": "auto" if rank == 0 else "eigh"}),
    }
    for field, make in attempts.items():
        projector, arguments = make()
        observe_batches(projector, model, x[rank::world], y[rank::world])
        started = time.monotonic()
        try:
            projector.build(**arguments)
            errors[field] = None
        except ValueError as error:
            errors[field] = (str(error), time.monotonic() - started)
    dist.barrier()  # the group is still usable: no collective was left half done
    return errors


def test_mismatched_configuration_fails_fast_on_every_rank(tmp_path):
    for errors in run_ranks(_mismatch_scenario, tmp_path):
        for field, outcome in errors.items():
            assert outcome is not None, f"a mismatched {field} was not refused"
            message, seconds = outcome
            assert f"ranks disagree on {field}" in message and seconds < 5.0
        assert "only on rank 0: ['hidden']" in errors["layers"][0]


# ----------------------------------------------------------------------------- 4b. pooled subtraction
def _subtract_scenario(rank: int, world: int) -> dict:
    """Rank 0 holds the kept data; rank 1 holds a 'request' group that is (a) a subset of it,
    (b) data from elsewhere. Only the pooled sums show which: each rank alone cannot tell."""
    generator = torch.Generator().manual_seed(0)
    kept = torch.randn(30, 6, generator=generator) * torch.tensor([3.0, 3.0, 1.0, 1.0, 0.5, 0.5])
    outside = torch.randn(30, 6, generator=generator) * 5
    outcome = {}
    for case, request in (("inside", kept[:10]), ("outside", outside)):
        model = nn.Linear(6, 2)
        projector = NullSpaceProjector(model, dtype=torch.float64)
        with projector.observe(group="kept"):
            model(kept if rank == 0 else kept[:0])
        if rank == 1:
            with projector.observe(group="request"):
                model(request)
        try:
            projector.build(subtract=["request"], allow_unobserved=True)
            outcome[case] = None
        except (ValueError, RuntimeError) as error:
            outcome[case] = str(error)
    return outcome


def test_pooled_subtraction_outside_the_kept_data_fails_on_every_rank(tmp_path):
    for rank, outcome in enumerate(run_ranks(_subtract_scenario, tmp_path)):
        assert outcome["inside"] is None, (rank, outcome["inside"])
        assert outcome["outside"] is not None and "indefinite" in outcome["outside"], (rank, outcome)


# ----------------------------------------------------------------------------- 5. single process
def test_single_process_build_needs_no_process_group():
    x, y = make_data()
    model = make_model()
    projector = NullSpaceProjector(model, threshold=0.95)
    observe_batches(projector, model, x, y)
    assert unsc_distributed.resolve_group(None) is None  # not initialised: a local build
    projector.build(exclude=(2,), keep_covariances="none")
    assert projector.built and projector.groups == []
    with pytest.raises(ValueError, match="keep_covariances"):
        projector.build(keep_covariances="some")
    with pytest.raises(RuntimeError, match="not initialized"):
        projector.build(process_group=object())


@pytest.mark.slow  # a real torchrun launch: three fresh interpreters importing torch
def test_torchrun_recipe_exits_cleanly(tmp_path):
    """The docs/distributed.md command, shortened (fewer epochs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "examples" / "unlearn_distributed.py"), "--epochs", "1", "--unlearn-epochs", "1",
    ]
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 120 s:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ranks identical: True" in done.stdout
