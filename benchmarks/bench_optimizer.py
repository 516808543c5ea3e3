"""Wrapper overhead: one ResNet-18 training step with AdamW (or SGD) vs NullSpaceOptimizer around it.

Both steps run forward, backward and the optimizer step on the same batch in the same
process, interleaved within every repeat (plain, wrapped, plain, wrapped, ...) so that load
on a shared machine hits both alike; min and median step times are printed with the overhead
in percent of the plain step (median and min). Issue 25's CPU targets: <= 10 % at batch 64
and <= 30 % at batch 8 (2 threads).

The projector is built once, from ``--observe`` random 32x32 images at ``--threshold``
(default 128 images, 0.97), and shared by every batch size: the ranks it keeps decide the
projection cost (per layer ``G U`` and ``(G U) U^T``, or with the complement when it is the
smaller side), which does not depend on the batch; the step it is compared with does.

``--inner`` picks the inner optimizer (AdamW, or SGD with momentum 0.9) and
``--project-gradients`` the wrapper's mode: ``auto`` (the default: one projection per weight
and step, the change for AdamW, the gradient for SGD), ``true`` (gradient and change) or
``false`` (the change); ``--no-project-gradients`` is ``--project-gradients false``.

The same interleaved rounds also time the **projection floor**: the projection products
alone (``ops.project_`` / ``ops.restrict_`` with the projector's factors on tensors shaped like
every tracked weight, as many per step as the wrapper runs), the part of the overhead that no
wrapper code can remove at these ranks; the table gives it in percent of the plain step, and
what the wrapper adds above it.

``--profile`` times once where the wrapped step's time goes (simple timers around the
wrapper's parts, then the top operators of ``torch.profiler``).

    python benchmarks/bench_optimizer.py [--batch 64 8] [--threads N] [--repeat 10] [--profile]
        [--inner adamw|sgd] [--project-gradients auto|true|false] [--quick] [--device cuda] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector, ops
from unsc_fast.evaluation.models import ResNet18

try:
    from benchmarks.harness import environment, synchronize, time_interleaved_ms, progress
except ImportError:  # run as a script from benchmarks/
    from harness import environment, synchronize, time_interleaved_ms, progress


INNER = {  # label, factory
    "adamw": ("AdamW", lambda params: torch.optim.AdamW(params, lr=1e-3)),
    "sgd": ("SGD", lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9)),
}
MODES = {"auto": "auto", "true": True, "false": False}


def projections_per_step(mode, inner: str) -> tuple[int, str]:
    """How many projections of each tracked weight one step runs, and which."""
    if mode == "auto":
        return 1, "gradient only" if inner == "sgd" else "change only"
    return (2, "gradient + change") if mode else (1, "change only")


def training_step(model, optimizer, x, y):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def build_projector(model, images: int, threshold: float, device: str) -> NullSpaceProjector:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(images, 3, 32, 32, generator=generator).to(device)
    projector = NullSpaceProjector(model, threshold=threshold)
    model.eval()
    with torch.no_grad(), projector.observe():
        for chunk in x.split(64):
            model(chunk)
    projector.build()
    model.train()
    return projector


def projection_flops(projector: NullSpaceProjector) -> float:
    """FLOPs of one projection of every tracked weight (a step does one or two,
    ``projections_per_step``): 4 * out * d * (columns used), columns = min(k, d - k)."""
    total = 0.0
    for name, layer in projector.layers.items():
        slot = projector._slot(name)
        if slot.kind != "dense":
            continue
        d = layer.dim
        k = projector.basis(name).shape[1]
        out = layer.weight.numel() // d
        total += 4.0 * out * d * min(k, d - k)
    return total


def projection_floor(projector: NullSpaceProjector, count: int, device: str):
    """A callable running the projection products of one step and nothing else: per tracked
    dense weight, ``count`` times ``restrict_`` with its complement or ``project_`` with its
    basis (the factor the wrapper uses) on a fixed random tensor of the weight's matrix shape."""
    generator = torch.Generator().manual_seed(2)
    jobs = []
    for name, layer in projector.layers.items():
        slot = projector._slot(name)
        if slot.kind != "dense":
            continue
        d = layer.dim
        matrix = torch.randn(layer.weight.numel() // d, d, generator=generator).to(device, layer.weight.dtype)
        complement = projector.solution.complements.get(slot.name)
        factor = complement if complement is not None else projector.solution.bases[slot.name]
        jobs.append((ops.restrict_ if complement is not None else ops.project_, matrix, factor.to(device)))

    def products():
        for _ in range(count):
            for op, matrix, factor in jobs:
                op(matrix, factor)

    return products


def profile_wrapped(model, optimizer: NullSpaceOptimizer, x, y, device: str, label: str, steps: int = 3) -> dict:
    """Time the wrapped step's parts with timers around the projector's calls and the inner
    step (monkeypatched on these instances only), then list torch.profiler's top operators."""
    projector, inner = optimizer.projector, optimizer.optimizer
    timings = defaultdict(float)
    phase = {"name": "gradient projection"}
    per_layer = defaultdict(float)
    original_project, original_step = projector.project_parameter_, inner.step

    def timed_project(name, tensor):
        synchronize(device)
        start = time.perf_counter()
        result = original_project(name, tensor)
        synchronize(device)
        elapsed = time.perf_counter() - start
        timings[phase["name"]] += elapsed
        per_layer[name] += elapsed
        return result

    def timed_step(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        result = original_step(*args, **kwargs)
        synchronize(device)
        timings[f"inner {label} step"] += time.perf_counter() - start
        phase["name"] = "change projection"
        return result

    projector.project_parameter_, inner.step = timed_project, timed_step
    try:
        for _ in range(steps + 1):  # the first one warms up
            timings.clear(), per_layer.clear()
            phase["name"] = "gradient projection"
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            synchronize(device)
            middle = time.perf_counter()
            optimizer.step()
            synchronize(device)
            end = time.perf_counter()
            parts = dict(timings)
            parts["forward + backward"] = middle - start
            accounted = sum(v for k, v in timings.items())
            parts["rest of the wrapper (copy of W0, subtract, add back, loop)"] = (end - middle) - accounted
            parts["total"] = end - start
            if _ == 0:
                totals = defaultdict(float)
                layers = defaultdict(float)
            else:
                for k, v in parts.items():
                    totals[k] += v / steps
                for k, v in per_layer.items():
                    layers[k] += v / steps
    finally:
        del projector.project_parameter_, inner.step  # back to the class methods
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        optimizer.step()  # the wrapper's step alone, on the last gradients
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    top_layers = sorted(layers.items(), key=lambda item: -item[1])[:6]
    return {"parts_ms": {k: 1e3 * v for k, v in totals.items()}, "top_layers_ms": [(k, 1e3 * v) for k, v in top_layers],
            "profiler_table": table}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 16 observed images, 3 repeats")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 64 8)")
    parser.add_argument("--observe", type=int, default=None, help="images the projector is built from (default 128)")
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2, quick 1)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved timed rounds (default 10, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--profile", action="store_true", help="also time where the wrapper's time goes")
    parser.add_argument("--inner", choices=sorted(INNER), default="adamw",
                        help="inner optimizer: AdamW (lr 1e-3) or SGD (lr 1e-2, momentum 0.9); default adamw")
    parser.add_argument("--project-gradients", choices=sorted(MODES), default="auto",
                        help="NullSpaceOptimizer(project_gradients=...): auto (default), true or false")
    parser.add_argument("--no-project-gradients", action="store_true", help="the same as --project-gradients false")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    mode = False if args.no_project_gradients else MODES[args.project_gradients]
    label, make_inner = INNER[args.inner]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = args.batch or ([8] if args.quick else [64, 8])
    observe = args.observe or (16 if args.quick else 128)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeat = args.repeat or (3 if args.quick else 10)

    torch.manual_seed(0)
    model = ResNet18().to(device)
    progress(f"building the projector from {observe} images at threshold {args.threshold} ...")
    start = time.perf_counter()
    projector = build_projector(model, observe, args.threshold, device)
    progress(f"built in {time.perf_counter() - start:.1f} s")
    kept = sum(projector.ranks().values())
    total = sum(layer.dim for layer in projector.layers.values())
    flops = projection_flops(projector)
    count, which = projections_per_step(mode, args.inner)
    env = environment(device)
    print(f"# optimizer wrapper overhead, ResNet-18 on 32x32; {env['device']}, torch {env['torch']}, {env['date']}; "
          f"projector from {observe} images at threshold {args.threshold}: kept {kept}/{total} basis columns, "
          f"{count * flops / 1e9:.2f} GFLOP of projection per step ({which}: project_gradients={mode!r})")
    print(f"\n| batch | {label} ms min / median | NullSpaceOptimizer({label}) ms min / median | overhead (medians) "
          "| overhead (mins) | projection products alone ms min / median | floor (medians) | above the floor (medians) |")
    print("|---|---|---|---|---|---|---|---|")
    floor = projection_floor(projector, count, device)
    rows, profiles = [], {}
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        plain_model, wrapped_model = copy.deepcopy(model), copy.deepcopy(model)
        wrapped_projector = NullSpaceProjector(wrapped_model).load_state_dict(projector.state_dict())
        plain = training_step(plain_model, make_inner(plain_model.parameters()), x, y)
        wrapped_optimizer = NullSpaceOptimizer(make_inner(wrapped_model.parameters()), wrapped_projector,
                                               project_gradients=mode)
        wrapped = training_step(wrapped_model, wrapped_optimizer, x, y)
        progress(f"batch {batch}: {warmup} warm-up + {repeat} interleaved rounds ...")
        times = time_interleaved_ms({"plain": plain, "wrapped": wrapped, "products": floor}, device, warmup, repeat)
        (plain_min, plain_med), (wrapped_min, wrapped_med) = times["plain"], times["wrapped"]
        products_min, products_med = times["products"]
        row = {"batch": batch, "plain_ms": [plain_min, plain_med], "wrapped_ms": [wrapped_min, wrapped_med],
               "products_ms": [products_min, products_med],
               "overhead_median_pct": 100 * (wrapped_med - plain_med) / plain_med,
               "overhead_min_pct": 100 * (wrapped_min - plain_min) / plain_min,
               "floor_median_pct": 100 * products_med / plain_med,
               "above_floor_median_pct": 100 * (wrapped_med - plain_med - products_med) / plain_med}
        rows.append(row)
        print(f"| {batch} | {plain_min:.1f} / {plain_med:.1f} | {wrapped_min:.1f} / {wrapped_med:.1f} "
              f"| {row['overhead_median_pct']:.1f} % | {row['overhead_min_pct']:.1f} % "
              f"| {products_min:.1f} / {products_med:.1f} | {row['floor_median_pct']:.1f} % "
              f"| {row['above_floor_median_pct']:.1f} % |", flush=True)
        if args.profile:
            progress(f"batch {batch}: profiling the wrapped step ...")
            profiles[batch] = profile_wrapped(wrapped_model, wrapped_optimizer, x, y, device, label)
    print(f"\nnote: {torch.get_num_threads()} torch threads; {warmup} warm-up and {repeat} timed interleaved rounds.")
    for batch, profile in profiles.items():
        print(f"\n## where the wrapped step's time goes, batch {batch} (mean of 3 steps, ms)\n")
        print("| part | ms |\n|---|---|")
        for part, ms in profile["parts_ms"].items():
            print(f"| {part} | {ms:.1f} |")
        print("\nslowest layers (all their projections): " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in profile["top_layers_ms"]))
        print("\ntorch.profiler, the wrapper's step alone (top operators by self CPU time):\n")
        print(profile["profiler_table"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "threads": torch.get_num_threads(), "kept": kept, "total": total,
                       "inner": args.inner, "project_gradients": mode,
                       "projection_gflop_per_step": count * flops / 1e9, "rows": rows,
                       "profiles": {b: {k: v for k, v in p.items() if k != "profiler_table"} for b, p in profiles.items()}},
                      handle, indent=2)


if __name__ == "__main__":
    main()
