"""Null-space projection ``G <- G - (G U) U^T`` in place: ``unsc_fast.ops.project_`` vs
the same in torch ops (``G -= (G @ U) @ U^T``; for bf16/fp16 G, through an fp32 copy).

GB/s is effective bandwidth: one read and one write of G (the least any in-place
implementation moves) divided by the time. TFLOP/s counts 4*out*d*k. Shapes: weight
matrices (out, d) of ResNet-18 / AllCNN convs (d = Cin*kh*kw), a ViT-B MLP and a
Linear with d = 4096, with k <= d/2 (the projector restricts to the complement above).

    python benchmarks/bench_projection.py [--quick] [--json out.json]
"""
from __future__ import annotations

import torch

try:
    from benchmarks import harness
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness

from unsc_fast import ops

# (name, out, d, k, dtype)
FULL_SHAPES = [
    ("AllCNN conv 192 3x3", 192, 1728, 128, torch.float32),
    ("ResNet-18 layer3 3x3", 256, 2304, 256, torch.float32),
    ("ResNet-18 layer4 3x3", 512, 4608, 512, torch.float32),
    ("ViT-B fc1 (3072, 768)", 3072, 768, 96, torch.float32),
    ("ViT-B fc2 (768, 3072)", 768, 3072, 384, torch.float32),
    ("Linear 4096, k=128", 4096, 4096, 128, torch.float32),
    ("Linear 4096, k=128", 4096, 4096, 128, torch.bfloat16),
    ("Linear 4096, k=1024", 4096, 4096, 1024, torch.float32),
]
QUICK_SHAPES = [
    ("conv 32 3x3", 64, 288, 32, torch.float32),
    ("Linear 512, k=64", 512, 512, 64, torch.float32),
    ("Linear 1024, k=128", 1024, 1024, 128, torch.float32),
    ("Linear 1024, k=128", 1024, 1024, 128, torch.bfloat16),
]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def plain_torch(G: torch.Tensor, U: torch.Tensor) -> None:
    if G.dtype == torch.float32:
        G.sub_((G @ U) @ U.mT)
    else:
        work = G.float()
        G.copy_(work - (work @ U) @ U.mT)


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    label = harness.ours_label("project_", device)
    ours_is_reference = label.startswith("torch")
    rows = []
    for name, out, d, k, dtype in QUICK_SHAPES if args.quick else FULL_SHAPES:
        G_ours = torch.randn(out, d, device=device).to(dtype)
        G_torch = G_ours.clone()
        U, _ = torch.linalg.qr(torch.randn(d, k, device=device))
        run_ours = lambda: ops.project_(G_ours, U)  # noqa: E731
        run_torch = lambda: plain_torch(G_torch, U)  # noqa: E731
        ours_ms = harness.time_ms(run_ours, device, args.warmup, args.repeat)
        torch_ms = harness.time_ms(run_torch, device, args.warmup, args.repeat)
        if device.startswith("cuda"):
            ours_mem = harness.format_bytes(harness.peak_extra_bytes(run_ours, device))
            torch_mem = harness.format_bytes(harness.peak_extra_bytes(run_torch, device))
        else:
            cast = out * d * 4 if dtype != torch.float32 else 0
            # (G U), (G U) U^T, and for the reference also G - that, before the copy back
            estimate = cast + out * k * 4 + out * d * 4
            reference_estimate = cast + out * k * 4 + 2 * out * d * 4
            ours_mem = harness.format_bytes(reference_estimate if ours_is_reference else 0, estimated=True)
            torch_mem = harness.format_bytes(estimate, estimated=True)
        moved = 2.0 * out * d * G_ours.element_size()
        flops = 4.0 * out * d * k
        rows.append({
            "shape": f"{name}: G ({out}, {d}), k={k}",
            "dtype": DTYPE_NAMES[dtype],
            "ours": label,
            "ours ms": f"{ours_ms:.3f}",
            "torch ms": f"{torch_ms:.3f}",
            "ours GB/s": f"{moved / ours_ms / 1e6:.3g}",
            "torch GB/s": f"{moved / torch_ms / 1e6:.3g}",
            "ours TFLOP/s": f"{flops / ours_ms / 1e9:.3g}",
            "ours peak": ours_mem,
            "torch peak": torch_mem,
            "ratio (torch/ours)": f"{torch_ms / ours_ms:.2f}x",
        })
    harness.finish(
        args,
        "project_: G -= (G U) U^T in place (ours vs matmul-sub in torch, same run)",
        ["shape", "dtype", "ours", "ours ms", "torch ms", "ours GB/s", "torch GB/s", "ours TFLOP/s",
         "ours peak", "torch peak", "ratio (torch/ours)"],
        rows,
        ["GB/s = one read + one write of G per call; TFLOP/s counts 4*out*d*k",
         f"median of {args.repeat} after {args.warmup} warm-up calls"],
    )


if __name__ == "__main__":
    main()
