"""Conv covariance with implicit im2col: ``unsc_fast.ops.conv_covariance_`` vs
``F.unfold`` + ``addmm`` (the explicit im2col every UNSC implementation uses).

Besides time it reports the peak extra memory of one call: on a GPU measured with
``torch.cuda.max_memory_allocated``; on CPU estimated from the buffers each way
allocates (the unfolded (B, d, L) tensor, its (B*L, d) transposed copy and, for bf16, the
fp32 cast of x; ours on a GPU: the per-split partials, if any), marked "est.".
Shapes: every distinct conv of AllCNN and ResNet-18 on 32x32x3 inputs, batch 128.

    python benchmarks/bench_conv_covariance.py [--quick] [--json out.json]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from benchmarks import harness
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness

from unsc_fast import ops

# (name, x shape (B, Cin, H, W), kernel, stride, padding)
FULL_SHAPES = [
    ("AllCNN/ResNet conv1 3x3", (128, 3, 32, 32), 3, 1, 1),
    ("AllCNN conv 96 3x3", (128, 96, 32, 32), 3, 1, 1),
    ("AllCNN conv 96 3x3 s2", (128, 96, 32, 32), 3, 2, 1),
    ("AllCNN conv 192 3x3", (128, 192, 16, 16), 3, 1, 1),
    ("AllCNN conv 192 3x3 p0", (128, 192, 8, 8), 3, 1, 0),
    ("AllCNN conv 192 1x1", (128, 192, 6, 6), 1, 1, 0),
    ("ResNet-18 layer1 3x3", (128, 64, 32, 32), 3, 1, 1),
    ("ResNet-18 layer2 3x3", (128, 128, 16, 16), 3, 1, 1),
    ("ResNet-18 layer3 3x3", (128, 256, 8, 8), 3, 1, 1),
    ("ResNet-18 layer4 3x3", (128, 512, 4, 4), 3, 1, 1),
    ("ResNet-18 downsample 1x1 s2", (128, 256, 8, 8), 1, 2, 0),
]
QUICK_SHAPES = [
    ("conv1 3x3", (16, 3, 32, 32), 3, 1, 1),
    ("conv 32 3x3", (16, 32, 16, 16), 3, 1, 1),
    ("conv 64 3x3 s2", (16, 64, 8, 8), 3, 2, 1),
    ("conv 64 1x1", (16, 64, 8, 8), 1, 1, 0),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plain_torch(C, x, kernel, stride, padding) -> None:
    """Explicit im2col: unfold (in fp32), make rows, one full addmm."""
    cols = F.unfold(x.float(), kernel, padding=padding, stride=stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    C.addmm_(rows.mT, rows)


def unfold_estimate_bytes(x, rows: int, d: int) -> int:
    cast = x.numel() * 4 if x.dtype != torch.float32 else 0
    return cast + 2 * rows * d * 4


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    label = harness.ours_label("conv_covariance_", device)
    ours_is_reference = label.startswith("torch")
    rows = []
    for name, shape, kernel, stride, padding in QUICK_SHAPES if args.quick else FULL_SHAPES:
        batch, channels, height, width = shape
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        d, N = channels * kernel * kernel, batch * out_h * out_w
        for dtype_name, dtype in DTYPES.items():
            x = torch.randn(shape, device=device).to(dtype)
            C_ours = torch.zeros(d, d, device=device)
            C_torch = torch.zeros(d, d, device=device)
            run_ours = lambda: ops.conv_covariance_(C_ours, x, kernel, stride, padding)  # noqa: E731
            run_torch = lambda: plain_torch(C_torch, x, kernel, stride, padding)  # noqa: E731
            ours_ms = harness.time_ms(run_ours, device, args.warmup, args.repeat)
            torch_ms = harness.time_ms(run_torch, device, args.warmup, args.repeat)
            if device.startswith("cuda"):
                ours_mem = harness.format_bytes(harness.peak_extra_bytes(run_ours, device))
                torch_mem = harness.format_bytes(harness.peak_extra_bytes(run_torch, device))
            else:
                estimate = unfold_estimate_bytes(x, N, d)
                ours_mem = harness.format_bytes(estimate if ours_is_reference else 0, estimated=True)
                torch_mem = harness.format_bytes(estimate, estimated=True)
            flops = 2.0 * N * d * d
            rows.append({
                "shape": f"{name}: {tuple(shape)} k{kernel} s{stride} p{padding} (N={N}, d={d})",
                "dtype": dtype_name,
                "ours": label,
                "ours ms": f"{ours_ms:.3f}",
                "unfold+addmm ms": f"{torch_ms:.3f}",
                "ours TFLOP/s": f"{flops / ours_ms / 1e9:.3g}",
                "unfold+addmm TFLOP/s": f"{flops / torch_ms / 1e9:.3g}",
                "ours peak": ours_mem,
                "unfold+addmm peak": torch_mem,
                "ratio (torch/ours)": f"{torch_ms / ours_ms:.2f}x",
            })
    harness.finish(
        args,
        "conv_covariance_: C += P^T P over conv patches (ours vs F.unfold + addmm, same run)",
        ["shape", "dtype", "ours", "ours ms", "unfold+addmm ms", "ours TFLOP/s", "unfold+addmm TFLOP/s",
         "ours peak", "unfold+addmm peak", "ratio (torch/ours)"],
        rows,
        ["TFLOP/s counts 2*N*d^2 for both ways; peak = extra memory of one call",
         f"median of {args.repeat} after {args.warmup} warm-up calls"],
    )


if __name__ == "__main__":
    main()
