"""End to end: building the projector for All-CNN, three pipelines on the same images and model.

The issue-14 workload: All-CNN at 0.5 width (48/96 filters, the official experiments' size),
3 classes x 256 images of 32x32, threshold 0.99, the images fed in batches of ``--batch``.

- **official**: the official UNSC/GPM way. Each layer's inputs are captured, its input
  patches gathered with a Python loop over samples and output positions into a (d, patches)
  representation matrix, ``numpy.linalg.svd`` of it, and the top singular vectors holding
  ``threshold`` of the squared singular values kept.
- **plain**: what an engineer would write in plain PyTorch: forward hooks, ``F.unfold`` and an
  fp32 ``addmm`` per label per layer into that label's covariance, the labels summed, fp64
  ``torch.linalg.eigh`` and the energy cut (written out below, no ``unsc_fast`` code).
- **ours**: ``NullSpaceProjector(model, threshold).observe(labels=y)`` over the same batches,
  then ``build()``.

Each timing covers the forward passes and the build. The pipelines run interleaved within
every repeat (official, plain, ours, official, plain, ours, ...) so that load on a shared
machine hits all alike; the official one takes minutes and by default runs in the first
repeat only (``--official-repeat``). Min and median seconds are printed, with the ratios of
the medians (and of the mins). ``--threads`` limits torch's threads and, with threadpoolctl,
numpy's BLAS threads for the official SVD. Per layer, the table compares the ranks and the
energy each basis keeps (over trace(C)), and the largest principal-angle sine between plain
and ours (large only where eigenvalues cluster at the cut: such directions are
interchangeable; ours may keep a few more columns on the randomized path).

``--floor`` adds the physical floor: the workload's covariance as one symmetric patch product
(``N P d (d + 1)`` FLOPs per layer over its N P patches of width d; the plain way's
``unfold + addmm`` does ``2 N P d^2``), the forward passes' FLOPs and the activation bytes the
covariance has to read at least once, against the machine's peaks measured in the same run
(a 2048^3 sgemm, a 512 MiB copy; ``benchmarks/machine_peak.py``).

    python benchmarks/bench_projector_build.py [--quick] [--threads N] [--repeat 3]
        [--official-repeat 1] [--images-per-class 256] [--batch 128] [--floor] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.evaluation.models import AllCNN

try:
    from benchmarks.harness import environment, progress
except ImportError:  # run as a script from benchmarks/
    from harness import environment, progress


def tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def blas_threads(threads: int | None):
    """Limit numpy's BLAS threads like torch's (the official SVD runs in numpy)."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


# ---------------------------------------------------------------- (a) official UNSC/GPM
def layer_inputs(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Every Conv2d/Linear input over all batches (the official code's activation capture)."""
    seen, handles = {}, []
    for name, module in tracked_layers(model).items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].detach())))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def loop_representation(module: nn.Module, activation: torch.Tensor) -> np.ndarray:
    """(d, patches) matrix built patch by patch with Python loops, as the official pipeline does."""
    if isinstance(module, nn.Linear):
        return activation.reshape(-1, module.in_features).T.numpy()
    kh, kw = module.kernel_size
    sh, sw = module.stride
    padded = F.pad(activation, module._reversed_padding_repeated_twice).numpy()
    batch, _, height, width = padded.shape
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    columns = []
    for sample in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                columns.append(padded[sample, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(-1))
    return np.stack(columns, axis=1)


def official_bases(model: nn.Module, batches, threshold: float, verbose: bool = False) -> dict[str, np.ndarray]:
    bases = {}
    inputs = layer_inputs(model, batches)
    for name, module in tracked_layers(model).items():
        representation = loop_representation(module, inputs.pop(name))
        U, S, _ = np.linalg.svd(representation, full_matrices=False)
        del representation
        energy = np.cumsum(S**2) / np.sum(S**2)
        k = int(np.searchsorted(energy, threshold) + 1)
        bases[name] = U[:, :k]
        if verbose:
            progress(f"  official: {name} done (d {U.shape[0]}, rank {k})")
    return bases


# ---------------------------------------------------------------- (b) plain PyTorch
def plain_pytorch_bases(model: nn.Module, batches, threshold: float) -> tuple[dict, dict]:
    """Forward hooks, F.unfold + fp32 addmm per label per layer, fp64 eigh, energy cut.
    Returns (bases, summed covariances)."""
    covariances: dict[tuple[int, str], torch.Tensor] = {}
    current = {}

    def hook(name, module, args, output):
        x, labels = args[0].detach(), current["labels"]
        for label in labels.unique().tolist():
            xs = x[labels == label]
            if isinstance(module, nn.Conv2d):
                cols = F.unfold(xs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                stride=module.stride)  # (B, d, L)
                rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            else:
                rows = xs.reshape(-1, xs.shape[-1])
            C = covariances.get((label, name))
            if C is None:
                C = covariances[(label, name)] = torch.zeros(rows.shape[1], rows.shape[1])
            C.addmm_(rows.T, rows)

    layers = tracked_layers(model)
    handles = [m.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for x, y in batches:
                current["labels"] = y
                model(x)
    finally:
        for handle in handles:
            handle.remove()

    bases, sums = {}, {}
    labels = sorted({label for label, _ in covariances})
    for name in layers:
        C = sum(covariances[(label, name)] for label in labels)
        eigenvalues, eigenvectors = torch.linalg.eigh(C.double())
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        energy = eigenvalues.cumsum(0) / eigenvalues.sum()
        k = int(torch.searchsorted(energy, torch.tensor([threshold], dtype=energy.dtype))) + 1
        bases[name] = eigenvectors[:, :k].float()
        sums[name] = C
    return bases, sums


# ---------------------------------------------------------------- (c) unsc_fast
def our_projector(model: nn.Module, batches, threshold: float) -> NullSpaceProjector:
    projector = NullSpaceProjector(model, threshold=threshold)
    with torch.no_grad():
        for x, y in batches:
            with projector.observe(labels=y):
                model(x)
    return projector.build()


# ---------------------------------------------------------------- physical floor
def workload_counts(model: nn.Module, batches) -> dict[str, dict]:
    """Per tracked layer: patch width d, patches N P, the covariance's FLOPs as a symmetric
    product and as unfold + addmm, the forward's FLOPs, the bytes of its input activations and
    of the unfold buffer (float32), over every batch."""
    counts, handles = {}, []

    def hook(name, module, args, output):
        x = args[0]
        if isinstance(module, nn.Conv2d):
            d = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            patches = x.shape[0] * output.shape[2] * output.shape[3]
            width = module.out_channels
        else:
            d, patches, width = x.shape[-1], x.numel() // x.shape[-1], module.out_features
        row = counts.setdefault(name, {"d": d, "patches": 0, "activation_bytes": 0})
        row["patches"] += patches
        row["activation_bytes"] += 4 * x.numel()
        row["forward_flop"] = row.get("forward_flop", 0) + 2 * patches * d * width

    for name, module in tracked_layers(model).items():
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    for row in counts.values():
        row["covariance_flop"] = row["patches"] * row["d"] * (row["d"] + 1)
        row["unfold_addmm_flop"] = 2 * row["patches"] * row["d"] ** 2
        row["unfold_bytes"] = 4 * row["patches"] * row["d"]
    return counts


def print_floor(counts: dict[str, dict], stats: dict) -> dict:
    """The floor table and lines (see the module docstring); returns what it printed, for --json."""
    try:
        from benchmarks.machine_peak import copy_gbytes, gemm_gflops
    except ImportError:  # run as a script from benchmarks/
        from machine_peak import copy_gbytes, gemm_gflops

    sgemm, dgemm, copy = gemm_gflops(torch.float32), gemm_gflops(torch.float64), copy_gbytes()
    print(f"\n## physical floor ({torch.get_num_threads()} torch threads; measured now: sgemm {sgemm:.1f} GFLOP/s, "
          f"dgemm {dgemm:.1f} GFLOP/s, copy {copy:.1f} GB/s read + write)\n")
    print("| layer | d | patches N P | covariance GFLOP (symmetric) | unfold + addmm GFLOP | forward GFLOP "
          "| activations MB | unfold buffer MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in counts.items():
        print(f"| {name} | {row['d']} | {row['patches']} | {row['covariance_flop'] / 1e9:.1f} "
              f"| {row['unfold_addmm_flop'] / 1e9:.1f} | {row['forward_flop'] / 1e9:.1f} "
              f"| {row['activation_bytes'] / 1e6:.1f} | {row['unfold_bytes'] / 1e6:.1f} |")
    total = {key: sum(row[key] for row in counts.values())
             for key in ("covariance_flop", "unfold_addmm_flop", "forward_flop", "activation_bytes", "unfold_bytes")}
    floor = {"sgemm_gflops": sgemm, "dgemm_gflops": dgemm, "copy_gbytes": copy, **total,
             "covariance_s": total["covariance_flop"] / sgemm / 1e9,
             "forward_s": total["forward_flop"] / sgemm / 1e9,
             "activation_read_s": total["activation_bytes"] / copy / 1e9}
    print(f"| total | | | {total['covariance_flop'] / 1e9:.1f} | {total['unfold_addmm_flop'] / 1e9:.1f} "
          f"| {total['forward_flop'] / 1e9:.1f} | {total['activation_bytes'] / 1e6:.1f} "
          f"| {total['unfold_bytes'] / 1e6:.1f} |")
    print(f"\n- covariance as a symmetric patch product at the sgemm peak: {floor['covariance_s']:.2f} s "
          f"(compute bound: reading the activations once takes {floor['activation_read_s']:.3f} s at the copy rate)")
    print(f"- forward passes at the sgemm peak: {floor['forward_s']:.2f} s (both pipelines run them)")
    print(f"- floor of a patch-product pipeline, forward + covariance (the fp64 eigh not counted, the same in "
          f"both): {floor['forward_s'] + floor['covariance_s']:.2f} s")
    for name in ("plain", "ours"):
        if stats.get(name):
            print(f"- {name}: median {stats[name][1]:.2f} s = {stats[name][1] / (floor['forward_s'] + floor['covariance_s']):.2f}x "
                  "that floor")
    return floor


# ---------------------------------------------------------------- comparison
def energy_kept(C: torch.Tensor, U) -> float:
    """trace(U^T C U) / trace(C): the share of the layer's input energy the basis holds."""
    C = C.double()
    U = torch.as_tensor(U).double()
    return float(torch.trace(U.mT @ C @ U) / torch.trace(C))


def largest_angle_sine(U, V) -> float:
    """sin of the largest principal angle between the smaller span and the larger one: 0 when
    the smaller basis lies inside the larger."""
    U, V = torch.as_tensor(U).double(), torch.as_tensor(V).double()
    small, large = (U, V) if U.shape[1] <= V.shape[1] else (V, U)
    if small.shape[1] == 0:
        return 0.0
    cosines = torch.linalg.svdvals(large.mT @ small)
    return float(max(0.0, 1.0 - float(cosines.min()) ** 2) ** 0.5)


def summary(values: list[float]) -> tuple[float, float] | None:
    return (min(values), statistics.median(values)) if values else None


def make_batches(classes: int, per_class: int, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * per_class, 3, 32, 32, generator=generator)
    y = torch.arange(classes).repeat_interleave(per_class)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: width 16, 3 x 8 images, 1 repeat")
    parser.add_argument("--width", type=int, default=None, help="All-CNN first-stage filters (default 48 = 0.5 width)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=None, help="default 256 (quick: 8)")
    parser.add_argument("--batch", type=int, default=128, help="images per forward")
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    parser.add_argument("--official-repeat", type=int, default=1,
                        help="repeats that also run the official pipeline (the first ones; 0: skip it)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of plain and ours on one small batch")
    parser.add_argument("--threads", type=int, default=None, help="torch (and numpy BLAS) CPU threads")
    parser.add_argument("--floor", action="store_true",
                        help="also print the physical floor: FLOPs and bytes against the measured peaks")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    width = args.width or (16 if args.quick else 48)
    per_class = args.images_per_class or (8 if args.quick else 256)
    repeat = args.repeat or (1 if args.quick else 3)
    official_repeat = min(args.official_repeat, repeat)

    torch.manual_seed(0)
    model = AllCNN(num_classes=10, width=width).eval()
    batches = make_batches(args.classes, per_class, args.batch)
    images = args.classes * per_class
    env = environment("cpu")
    from unsc_fast.ops.dispatch import extension_available

    extension = "built" if extension_available() else "NOT built (reference path)"
    header = (f"# projector build, All-CNN width {width}, {args.classes} classes x {per_class} images 32x32 "
              f"(batches of {args.batch}), threshold {args.threshold}; {env['device']}, torch {env['torch']}, "
              f"{env['date']}; C++ extension {extension}")
    progress(header)

    for _ in range(args.warmup):  # first-call costs (allocator, extension load) off the clock
        warm = [(batches[0][0][:8], batches[0][1][:8])]
        plain_pytorch_bases(model, warm, args.threshold)
        our_projector(model, warm, args.threshold)

    times = {"official": [], "plain": [], "ours": []}
    results = {}
    for r in range(repeat):
        order = ("official", "plain", "ours") if r < official_repeat else ("plain", "ours")
        for pipeline in order:
            progress(f"repeat {r + 1}/{repeat}: {pipeline} ...")
            start = time.perf_counter()
            with blas_threads(args.threads):
                if pipeline == "official":
                    result = official_bases(model, batches, args.threshold, verbose=not args.quick)
                elif pipeline == "plain":
                    result = plain_pytorch_bases(model, batches, args.threshold)
                else:
                    result = our_projector(model, batches, args.threshold)
            elapsed = time.perf_counter() - start
            times[pipeline].append(elapsed)
            results[pipeline] = result
            progress(f"repeat {r + 1}/{repeat}: {pipeline} {elapsed:.2f} s")

    plain, covariances = results["plain"]
    projector = results["ours"]
    official = results.get("official")
    print(header)
    print("\n| layer | d | rank official | rank plain | rank ours | energy official | energy plain | energy ours "
          "| max sin(angle) plain/ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows, differ = [], []
    for name, U_plain in plain.items():
        U_ours = projector.basis(name)
        C = covariances[name]
        row = {"layer": name, "d": U_plain.shape[0], "rank_plain": U_plain.shape[1], "rank_ours": U_ours.shape[1],
               "energy_plain": energy_kept(C, U_plain), "energy_ours": energy_kept(C, U_ours),
               "max_sin_angle": largest_angle_sine(U_plain, U_ours)}
        if official is not None:
            row.update(rank_official=official[name].shape[1], energy_official=energy_kept(C, official[name]))
        rows.append(row)
        if row["rank_plain"] != row["rank_ours"]:
            differ.append(row)
        off_rank = row.get("rank_official", "-")
        off_energy = f"{row['energy_official']:.5f}" if official is not None else "-"
        print(f"| {name} | {row['d']} | {off_rank} | {row['rank_plain']} | {row['rank_ours']} | {off_energy} "
              f"| {row['energy_plain']:.5f} | {row['energy_ours']:.5f} | {row['max_sin_angle']:.1e} |")
    if differ:
        print("\nranks differ (plain vs ours) on: " + ", ".join(
            f"{r['layer']} ({r['rank_plain']} vs {r['rank_ours']}, d {r['d']})" for r in differ)
            + ". Ours takes the randomized energy basis where d >= 512 and the rank stays under its budget "
              "(0.25 d for float32 statistics): it stops once the captured energy reaches the threshold and "
              "may keep a few more columns than the exact eigh cut; both keep at least the threshold of the "
              "energy (columns above).")
    else:
        print("\nranks: plain and ours agree on every layer.")

    print("\n| pipeline | runs | min s | median s |\n|---|---|---|---|")
    labels = {"official": "(a) official (loop im2col + numpy SVD)",
              "plain": "(b) plain PyTorch (unfold + addmm per label, fp64 eigh)",
              "ours": "(c) unsc_fast (observe + build)"}
    stats = {name: summary(values) for name, values in times.items()}
    for name, label in labels.items():
        if stats[name] is not None:
            print(f"| {label} | {len(times[name])} | {stats[name][0]:.2f} | {stats[name][1]:.2f} |")
    ours_min, ours_med = stats["ours"]
    print(f"| ratio plain / ours (of mins, of medians) | | {stats['plain'][0] / ours_min:.2f}x | "
          f"{stats['plain'][1] / ours_med:.2f}x |")
    if stats["official"] is not None:
        print(f"| ratio official / ours (of mins, of medians) | | {stats['official'][0] / ours_min:.1f}x | "
              f"{stats['official'][1] / ours_med:.1f}x |")
    if 0 < official_repeat < repeat:
        print(f"\nnote: the official pipeline ran in the first {official_repeat} of {repeat} repeats only "
              "(--official-repeat); its ratio compares its runs with all of ours.")
    elif official_repeat == 0:
        print("\nnote: the official pipeline was skipped (--official-repeat 0).")
    print(f"note: {torch.get_num_threads()} torch threads; images {images}; times include the forward passes.")
    floor = print_floor(workload_counts(model, batches), stats) if args.floor else None
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "width": width, "images": images, "batch": args.batch,
                       "threshold": args.threshold, "threads": torch.get_num_threads(), "times_s": times,
                       "layers": rows, "floor": floor}, handle, indent=2)


if __name__ == "__main__":
    main()
