"""Linear covariance ``C += x^T x``: ``unsc_fast.ops.covariance_`` vs ``torch.addmm``.

Ours computes only the blocks on and above the diagonal (about half of addmm's
multiply-adds); TFLOP/s counts the full 2*N*d^2 for both, so it is comparable.
Shapes: DESIGN.md section 5 (classifier Linear of AllCNN/ResNet-18, ViT-B block inputs
(B, T, d) flattened, a large Linear with d = 4096).

    python benchmarks/bench_covariance.py [--quick] [--json out.json]
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


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    label = harness.ours_label("covariance_", device)
    rows = []
    for name, N, d in QUICK_SHAPES if args.quick else FULL_SHAPES:
        for dtype_name, dtype in DTYPES.items():
            x = torch.randn(N, d, device=device).to(dtype)
            C_ours = torch.zeros(d, d, device=device)
            C_torch = torch.zeros(d, d, device=device)
            ours_ms = harness.time_ms(lambda: ops.covariance_(C_ours, x), device, args.warmup, args.repeat)
            torch_ms = harness.time_ms(lambda: plain_torch(C_torch, x), device, args.warmup, args.repeat)
            flops = 2.0 * N * d * d
            rows.append({
                "shape": f"{name}: ({N}, {d})",
                "dtype": dtype_name,
                "ours": label,
                "ours ms": f"{ours_ms:.3f}",
                "addmm ms": f"{torch_ms:.3f}",
                "ours TFLOP/s": f"{flops / ours_ms / 1e9:.3g}",
                "addmm TFLOP/s": f"{flops / torch_ms / 1e9:.3g}",
                "ratio (addmm/ours)": f"{torch_ms / ours_ms:.2f}x",
            })
    harness.finish(
        args,
        "covariance_: C += x^T x (ours vs torch.addmm, same run)",
        ["shape", "dtype", "ours", "ours ms", "addmm ms", "ours TFLOP/s", "addmm TFLOP/s", "ratio (addmm/ours)"],
        rows,
        ["TFLOP/s counts 2*N*d^2 for both ways", f"median of {args.repeat} after {args.warmup} warm-up calls"],
    )


if __name__ == "__main__":
    main()
