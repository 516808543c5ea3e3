"""End to end: building the projector for All-CNN, ours vs the official UNSC/GPM pipeline.

The official code gathers each conv layer's input patches with a Python loop over samples
and output positions, stacks them into a (d, patches) representation matrix, and takes
``numpy.linalg.svd`` of it; the basis keeps the top singular vectors holding ``threshold``
of the squared singular values. Ours streams ``sum a a^T`` through the forward hooks
(``unsc_fast.ops``) and takes the energy basis of the d x d covariance. Both see the same
samples; the table compares time, the energy each basis keeps (over trace(C)) and the
subspaces found (largest principal-angle sine, which is large wherever eigenvalues cluster at
the cut: such directions are interchangeable, and the energy column is what UNSC relies on).

    python benchmarks/bench_projector_build.py [--quick] [--samples N] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.evaluation.models import AllCNN

try:
    from benchmarks.harness import environment
except ImportError:  # run as a script from benchmarks/
    from harness import environment


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Conv2d/Linear input of one forward (the official code's activation capture)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach())))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


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


def official_bases(model: nn.Module, x: torch.Tensor, threshold: float) -> dict[str, np.ndarray]:
    bases = {}
    inputs = layer_inputs(model, x)
    for name, module in model.named_modules():
        if name not in inputs:
            continue
        representation = loop_representation(module, inputs[name])
        U, S, _ = np.linalg.svd(representation, full_matrices=False)
        energy = np.cumsum(S**2) / np.sum(S**2)
        k = int(np.searchsorted(energy, threshold) + 1)
        bases[name] = U[:, :k]
    return bases


def our_projector(model: nn.Module, x: torch.Tensor, threshold: float) -> NullSpaceProjector:
    projector = NullSpaceProjector(model, threshold=threshold)
    with torch.no_grad(), projector.observe():
        model(x)
    return projector.build()


def energy_kept(C: torch.Tensor, U) -> float:
    """trace(U^T C U) / trace(C): the share of the layer's input energy the basis holds."""
    C = C.double()
    U = torch.as_tensor(U).double()
    return float(torch.trace(U.mT @ C @ U) / torch.trace(C))


def largest_angle_sine(U: np.ndarray, V: torch.Tensor) -> float:
    """sin of the largest principal angle between the smaller span and the larger one: 0 when
    the smaller basis lies inside the larger (ranks may differ by the randomized path's few
    extra columns)."""
    V = V.double().numpy()
    small, large = (U, V) if U.shape[1] <= V.shape[1] else (V, U)
    if small.shape[1] == 0:
        return 0.0
    cosines = np.linalg.svd(large.T @ small, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - cosines.min() ** 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow All-CNN and few samples")
    parser.add_argument("--samples", type=int, default=None, help="images observed (default 125, quick 16)")
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    samples = args.samples or (16 if args.quick else 125)
    torch.manual_seed(0)
    model = AllCNN(width=32 if args.quick else 96).eval()
    x = torch.randn(samples, 3, 32, 32)

    start = time.perf_counter()
    projector = our_projector(model, x, args.threshold)
    ours_s = time.perf_counter() - start
    ours = {name: projector.basis(name) for name in projector.layers}
    start = time.perf_counter()
    official = official_bases(model, x, args.threshold)
    official_s = time.perf_counter() - start

    env = environment("cpu")
    print(f"# projector build, All-CNN (width {32 if args.quick else 96}), {samples} images 32x32, "
          f"threshold {args.threshold}; {env['device']}, torch {env['torch']}, {env['date']}")
    print("| layer | d | rank official | rank ours | energy official | energy ours | max sin(angle) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, U in official.items():
        angle = largest_angle_sine(U, ours[name])
        C = projector.covariance(name)
        kept_official, kept_ours = energy_kept(C, U), energy_kept(C, ours[name])
        rows.append({"layer": name, "d": U.shape[0], "rank_official": U.shape[1],
                     "rank_ours": ours[name].shape[1], "energy_official": kept_official,
                     "energy_ours": kept_ours, "max_sin_angle": angle})
        print(f"| {name} | {U.shape[0]} | {U.shape[1]} | {ours[name].shape[1]} | {kept_official:.5f} "
              f"| {kept_ours:.5f} | {angle:.1e} |")
    print(f"\n| pipeline | seconds |\n|---|---|\n| official (loop im2col + numpy SVD) | {official_s:.2f} |"
          f"\n| unsc_fast (streamed covariance + energy basis) | {ours_s:.2f} |\n| ratio (official / ours) | "
          f"{official_s / ours_s:.1f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "samples": samples, "official_s": official_s, "ours_s": ours_s,
                       "layers": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
