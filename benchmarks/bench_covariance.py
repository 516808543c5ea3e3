"""Linear covariance ``C += x^T x``: ``unsc_fast.ops.covariance_`` vs ``torch.addmm``.

Ours computes only the blocks on and above the diagonal (about half of addmm's
multiply-adds); GFLOP/s counts the full 2*N*d^2 for both, so it is comparable. On CPU
"ours" is the extension's kernel (``backend="ext"``) when built, and the table says
what ``auto`` picks at each width; the two are timed interleaved (A B A B), min / median.
Shapes: DESIGN.md section 5 (classifier Linear of AllCNN/ResNet-18, ViT-B block inputs
(B, T, d) flattened, a large Linear with d = 4096).

    python benchmarks/bench_covariance.py [--threads N] [--quick] [--json out.json]
"""
from __future__ import annotations

import torch

try:
    from benchmarks import harness
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness

from unsc_fast import ops

# (name, N rows, d)
FULL_SHAPES = [
    ("classifier Linear(512), B=128", 128, 512),
    ("ViT-B qkv/fc1 in (64,197,768)", 64 * 197, 768),
    ("ViT-B fc2 in (64,197,3072)", 64 * 197, 3072),
    ("Linear d=4096, 8192 tokens", 8192, 4096),
]
QUICK_SHAPES = [
    ("classifier Linear(512), B=128", 128, 512),
    ("ViT-tiny in (8,65,192)", 8 * 65, 192),
    ("Linear d=1024, 2048 tokens", 2048, 1024),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plain_torch(C: torch.Tensor, x: torch.Tensor) -> None:
    """The plain-PyTorch way: upcast if needed, then one full addmm."""
    rows = x if x.dtype == torch.float32 else x.float()
    C.addmm_(rows.mT, rows)


CPU_SHAPES = [
    ("AllCNN-48 classifier in, B=256", 256, 96),
    ("ViT-tiny in (8,65,192)", 8 * 65, 192),
    ("AllCNN-96 classifier in 192, 4096 rows", 4096, 192),
    ("classifier Linear(512), 4096 rows", 4096, 512),
    ("ViT-S in (16,197,384) d=768", 16 * 197, 768),
    ("Linear d=1024, 4096 tokens", 4096, 1024),
    ("Linear d=2048, 4096 tokens", 4096, 2048),
]


def main(argv=None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default: fp32 on CPU, both on GPU)")
    known, rest = extra.parse_known_args(argv)
    args = harness.parse_args(__doc__.splitlines()[0], rest)
    device = args.device
    on_cpu = not device.startswith("cuda")
    backend = (harness.cpu_extension_backend() if on_cpu else None) or "auto"
    label = harness.ours_label("covariance_", device) if backend == "auto" else backend
    shapes = CPU_SHAPES if on_cpu and not args.quick else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    dtype_names = (known.dtypes or ("fp32" if on_cpu else "fp32,bf16")).split(",")
    rows = []
    for name, N, d in shapes:
        for dtype_name in dtype_names:
            x = torch.randn(N, d, device=device).to(DTYPES[dtype_name])
            C_ours = torch.zeros(d, d, device=device)
            C_torch = torch.zeros(d, d, device=device)
            timed = harness.time_interleaved_ms(
                {"ours": lambda: ops.covariance_(C_ours, x, backend=backend), "torch": lambda: plain_torch(C_torch, x)},
                device, args.warmup, args.repeat,
            )
            (ours_min, ours_ms), (torch_min, torch_ms) = timed["ours"], timed["torch"]
            flops = 2.0 * N * d * d
            auto = "ext" if on_cpu and backend == "ext" and ops._dense_ext_faster(d) else None
            rows.append({
                "shape": f"{name}: ({N}, {d})",
                "dtype": dtype_name,
                "ours": label,
                "auto picks": auto or ("torch" if on_cpu else label),
                "ours ms min/med": f"{ours_min:.2f} / {ours_ms:.2f}",
                "addmm ms min/med": f"{torch_min:.2f} / {torch_ms:.2f}",
                "ours GFLOP/s": f"{flops / ours_ms / 1e6:.3g}",
                "addmm GFLOP/s": f"{flops / torch_ms / 1e6:.3g}",
                "ratio (addmm/ours)": f"{torch_ms / ours_ms:.2f}x",
            })
    harness.finish(
        args,
        "covariance_: C += x^T x (ours vs torch.addmm, same run)",
        ["shape", "dtype", "ours", "auto picks", "ours ms min/med", "addmm ms min/med", "ours GFLOP/s",
         "addmm GFLOP/s", "ratio (addmm/ours)"],
        rows,
        ["GFLOP/s counts 2*N*d^2 for both ways; ratio = median / median",
         f"{args.repeat} interleaved repeats (ours, addmm, ours, addmm, ...) after {args.warmup} warm-up rounds; "
         f"{torch.get_num_threads()} threads"],
    )


if __name__ == "__main__":
    main()
