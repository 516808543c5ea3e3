"""Energy-threshold basis: ours (adaptive randomized, C++ extension) vs dense eigh and the usual
randomized SVDs, in one run on the same matrices.

For every covariance: the smallest k top eigenvectors holding ``threshold`` of the energy.

- ``eigh``: ``torch.linalg.eigh`` in the input dtype, then the cut (the plain-PyTorch way);
- ``ours ext`` / ``ours torch``: ``ops.energy_basis(method="randomized")`` through the C++
  extension and through its Python reference (same algorithm, bitwise equal on CPU);
- ``eigh fp64``: ``reference.energy_basis_eigh``, the dense path the library takes (float64,
  because fp32 eigh gives negative eigenvalues on ill-conditioned covariances);
- ``ours auto``: ``ops.energy_basis()`` as the projector calls it (the dense path below
  ``MIN_RANDOMIZED_DIM`` and where the pilot predicts an overrun; past the sketch's budget,
  ``MAX_RANK_FRACTION_FP32 * d`` for float32 below threshold 1, else ``MAX_RANK_FRACTION * d``,
  the sketch stops and the dense path runs: fp32 eigh where its cut is clear, else fp64);
- ``svd_lowrank`` / ``sklearn``: ``torch.svd_lowrank`` and ``sklearn.utils.extmath.randomized_svd``
  with q = k_eigh + 10 and 2 power iterations. They need the rank in advance, so they are
  handed eigh's k (an oracle ours does not get); their basis is cut at the same k.

``captured`` is the energy of the basis, ``trace(U^T C U)``, over the reference total
``trace(C)`` (``reference.energy_rank``): the target is ``threshold``.
``speedup`` = eigh time / method time.

Spectra: synthetic decays (exp, power law) and real layer covariances of a small CNN trained
for a few epochs on scikit-learn's bundled digits (no download); their widths are 9, 288,
576, 1152, 2304 and 4608.

    python benchmarks/bench_energy_basis.py [--quick] [--dtype float32] [--threshold 0.99] [--threads N]
    python benchmarks/bench_energy_basis.py --crossover 1152 [--fractions 0.1 0.2 0.3]   # time vs k/d
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

try:
    from benchmarks.harness import environment, print_table, time_ms
except ImportError:  # run as a script from benchmarks/
    from harness import environment, print_table, time_ms

from unsc_fast import ops
from unsc_fast.ops import dense, randomized, reference
from unsc_fast.ops.dispatch import extension_available

FULL_DIMS = (27, 576, 1152, 2304, 4608, 8192)
QUICK_DIMS = (27, 288, 576, 1152)
CROSSOVER_FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"d in {QUICK_DIMS} (CPU-friendly)")
    parser.add_argument("--dims", type=int, nargs="*", help="synthetic widths (default: full or quick set)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--spectra", nargs="*", default=("exp", "power", "digits"),
                        help="exp, power, digits (real layer covariances)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the digits CNN")
    parser.add_argument("--max-real-dim", type=int, default=None, help="skip real layers wider than this")
    parser.add_argument("--baselines", nargs="*", default=("svd_lowrank", "sklearn"))
    parser.add_argument("--crossover", type=int, metavar="D", help="instead: time vs k/d at width D")
    parser.add_argument("--fractions", type=float, nargs="*", default=CROSSOVER_FRACTIONS,
                        help="k/d values of the crossover")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.repeat is None:
        args.repeat = 3
    return args


def synthetic(kind: str, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """``Q diag(lambda) Q^T`` with a random orthogonal Q and a realistic decay."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(d, dtype=torch.float64)
    if kind == "exp":  # effective rank ~ d / 20
        eigenvalues = torch.exp(-index / max(1.0, d / 20))
    elif kind == "power":  # heavy tail, as conv layer inputs
        eigenvalues = (1 + index) ** -1.5
    else:
        raise ValueError(kind)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return ((Q * eigenvalues) @ Q.mT).to(dtype=dtype, device=device)


def decay_for_rank_fraction(d: int, fraction: float, threshold: float) -> torch.Tensor:
    """Exponential spectrum whose energy rank at ``threshold`` is about ``fraction * d``.

    The decay length is the midpoint between the two where the rank steps to ``fraction * d``
    and to one more: at either step the cut would sit exactly on the threshold, a tie that no
    real covariance has and that makes auto's fp32 eigh give way to fp64 (``ops.dense``)."""
    index = torch.arange(d, dtype=torch.float64)

    def step(rank: float) -> float:  # bisection on the decay length: where the rank reaches ``rank``
        low, high = 1e-3, 1e6
        for _ in range(80):
            tau = math.sqrt(low * high)
            eigenvalues = torch.exp(-index / tau)
            cumulative = eigenvalues.cumsum(0) / eigenvalues.sum()
            low, high = (tau, high) if int((cumulative < threshold).sum()) + 1 < rank else (low, tau)
        return math.sqrt(low * high)

    rank = math.ceil(fraction * d)
    return torch.exp(-index / ((step(rank) + step(rank + 1)) / 2))


class DigitsCNN(nn.Module):
    """Widths chosen so the conv inputs are 9, 288, 576, 1152, 2304, 4608 wide."""

    def __init__(self):
        super().__init__()
        widths = (1, 32, 64, 128, 256, 512, 512)
        layers = []
        for i in range(6):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.ReLU()]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def digits_covariances(epochs: int, dtype: torch.dtype, device: str, max_dim: int | None) -> dict[str, torch.Tensor]:
    """Per-layer input covariances (conv patches) of the CNN above trained on load_digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    covariances, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            d = module.weight[0].numel()
            if max_dim is not None and d > max_dim:
                continue
            covariances[name] = torch.zeros(d, d, dtype=torch.float64)

            def hook(module, args, output, name=name):
                if isinstance(module, nn.Conv2d):
                    ops.conv_covariance_(covariances[name], args[0], module.kernel_size, module.stride,
                                         module.padding, module.dilation, backend="torch")
                else:
                    ops.covariance_(covariances[name], args[0], backend="torch")

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in torch.arange(len(x)).split(256):
            model(x[batch])
    for handle in hooks:
        handle.remove()
    return {f"digits {name}": (C / len(x)).to(dtype=dtype, device=device) for name, C in covariances.items()}


def reference_total(C: torch.Tensor) -> tuple[torch.Tensor, float]:
    eigenvalues, _ = reference.symmetric_eigh(C)
    return eigenvalues, float(eigenvalues.sum())


def captured_energy(C: torch.Tensor, U: torch.Tensor, total: float) -> float:
    if total == 0.0 or U.shape[1] == 0:
        return 1.0 if total == 0.0 else 0.0
    U = U.to(torch.float64)
    return float(torch.trace(U.mT @ C.to(torch.float64) @ U)) / total


def eigh_basis(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """The plain-PyTorch way in the input dtype: eigh, then the cut."""
    eigenvalues, eigenvectors = torch.linalg.eigh((C + C.mT) / 2)
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    k = reference.energy_rank(eigenvalues, threshold, torch.finfo(C.dtype).eps)
    return eigenvectors.flip(1)[:, :k]


def lowrank_basis(C: torch.Tensor, k: int, q: int) -> torch.Tensor:
    U, _, _ = torch.svd_lowrank(C, q=q, niter=2)
    return U[:, :k]


def sklearn_basis(C: torch.Tensor, k: int, q: int) -> torch.Tensor:
    from sklearn.utils.extmath import randomized_svd

    U, _, _ = randomized_svd(C.cpu().numpy(), n_components=q, n_oversamples=0, n_iter=2, random_state=0)
    return torch.from_numpy(U[:, :k].copy())


def compare(label: str, C: torch.Tensor, args) -> list[dict]:
    """One row per method for the matrix ``C``."""
    d = C.shape[0]
    _, total = reference_total(C)
    threshold = args.threshold
    timings = {}

    def run(name, fn):
        timings[name] = time_ms(fn, args.device, args.warmup, args.repeat)
        return fn()

    U_eigh = run("eigh", lambda: eigh_basis(C, threshold))
    k_eigh = U_eigh.shape[1]
    q = min(d, k_eigh + 10)
    methods = {"eigh": U_eigh}
    # What auto falls back to: eigh in float64 (fp32 eigh breaks on ill-conditioned inputs).
    methods["eigh fp64"] = run("eigh fp64", lambda: reference.energy_basis_eigh(C, threshold))
    if extension_available():
        methods["ours ext"] = run("ours ext", lambda: ops.energy_basis(
            C, threshold, torch.Generator(C.device).manual_seed(0), backend="ext", method="randomized"))
    methods["ours torch"] = run("ours torch", lambda: ops.energy_basis(
        C, threshold, torch.Generator(C.device).manual_seed(0), backend="torch", method="randomized"))
    methods["ours auto"] = run("ours auto", lambda: ops.energy_basis(
        C, threshold, torch.Generator(C.device).manual_seed(0)))
    if "svd_lowrank" in args.baselines and k_eigh > 0:
        methods["svd_lowrank(k+10)"] = run("svd_lowrank(k+10)", lambda: lowrank_basis(C, k_eigh, q))
    if "sklearn" in args.baselines and k_eigh > 0:
        methods["sklearn(k+10)"] = run("sklearn(k+10)", lambda: sklearn_basis(C, k_eigh, q))
    rows = []
    for name, U in methods.items():
        rows.append({
            "matrix": label, "d": d, "method": name, "k": U.shape[1],
            "k/d": f"{U.shape[1] / d:.3f}",
            "captured": f"{captured_energy(C, U, total):.5f}",
            "ms": f"{timings[name]:.1f}",
            "speedup": f"{timings['eigh'] / timings[name]:.2f}x",
        })
    return rows


def crossover(args) -> tuple[list[dict], list[str]]:
    """Time of the randomized path against the dense ones as the needed rank grows, at one
    width: fp32 eigh (the plain-PyTorch way), fp64 eigh (auto's dense path for float64 input
    or threshold 1) and ``dense auto`` (auto's dense path for float32: fp32 eigh with its cut
    check, fp64 where that fails; ``ops.dense``). Where the sketch stops beating the dense
    path auto would run sets ``randomized.MAX_RANK_FRACTION`` / ``MAX_RANK_FRACTION_FP32``."""
    d = args.crossover
    generator = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    rows = []
    for fraction in args.fractions:
        eigenvalues = decay_for_rank_fraction(d, fraction, args.threshold)
        C = ((Q * eigenvalues) @ Q.mT).to(dtype=args.dtype, device=args.device)
        backend = "ext" if extension_available() else "torch"
        t_eigh = time_ms(lambda: eigh_basis(C, args.threshold), args.device, args.warmup, args.repeat)
        t_fp64 = time_ms(lambda: reference.energy_basis_eigh(C, args.threshold), args.device,
                         args.warmup, args.repeat)
        t_dense = time_ms(lambda: dense.eigh_factors(C, args.threshold, fp32_first=True, complement=False),
                          args.device, args.warmup, args.repeat)
        t_ours = time_ms(lambda: ops.energy_basis(C, args.threshold, torch.Generator().manual_seed(0),
                                                  backend=backend, method="randomized"),
                         args.device, args.warmup, args.repeat)
        k = ops.energy_basis(C, args.threshold, torch.Generator().manual_seed(0), backend=backend,
                             method="randomized").shape[1]
        fp32_cut = dense.tries_fp32(C, args.threshold) and dense.fp32_factors(C, args.threshold, False) is not None
        rows.append({"d": d, "k": k, "k/d": f"{k / d:.3f}", "eigh ms": f"{t_eigh:.1f}",
                     "eigh fp64 ms": f"{t_fp64:.1f}", "dense auto ms": f"{t_dense:.1f}",
                     "fp32 kept": "yes" if fp32_cut else "no", "ours ms": f"{t_ours:.1f}",
                     "speedup": f"{t_eigh / t_ours:.2f}x", "vs fp64": f"{t_fp64 / t_ours:.2f}x",
                     "vs dense auto": f"{t_dense / t_ours:.2f}x"})
        print(rows[-1], flush=True)
    return rows, [f"backend {backend}, method='randomized' (no fallback), threshold {args.threshold}"]


def main(argv=None) -> None:
    args = parse_args(argv)
    env = environment(args.device)
    started = time.perf_counter()
    if args.crossover:
        rows, notes = crossover(args)
        columns = ("d", "k", "k/d", "eigh ms", "eigh fp64 ms", "dense auto ms", "fp32 kept", "ours ms", "speedup",
                   "vs fp64", "vs dense auto")
        title = f"Energy basis crossover, {str(args.dtype).removeprefix('torch.')}"
    else:
        dims = args.dims or (QUICK_DIMS if args.quick else FULL_DIMS)
        rows = []
        for kind in ("exp", "power"):
            if kind in args.spectra:
                for d in dims:
                    rows += compare(f"{kind}", synthetic(kind, d, args.dtype, args.device), args)
                    print(f"  done {kind} d={d}", flush=True)
        if "digits" in args.spectra:
            max_dim = args.max_real_dim or (max(QUICK_DIMS) if args.quick else None)
            for label, C in digits_covariances(args.epochs, args.dtype, args.device, max_dim).items():
                rows += compare(label, C, args)
                print(f"  done {label}", flush=True)
        columns = ("matrix", "d", "method", "k", "k/d", "captured", "ms", "speedup")
        title = f"Energy basis at threshold {args.threshold}, {str(args.dtype).removeprefix('torch.')}"
        notes = ["svd_lowrank/sklearn are given eigh's k (oracle rank); ours finds k itself",
                 f"median of {args.repeat} calls after {args.warmup} warm-up"]
    notes = [f"{env['device']}, torch {env['torch']}, {env['date']}",
             f"total {time.perf_counter() - started:.0f} s"] + notes
    print_table(title, columns, rows, notes)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"title": title, "environment": env, "rows": rows, "notes": notes}, handle, indent=2)


if __name__ == "__main__":
    main()
