"""Conv covariance with implicit im2col: ``unsc_fast.ops.conv_covariance_`` vs
``F.unfold`` + ``addmm`` (the explicit im2col every UNSC implementation uses).

On CPU "ours" is the extension's kernel (``backend="ext"``, which ``auto`` picks there)
when it is built. Ours and the baseline are timed interleaved (A B A B) and reported as
min / median; the ratio is of medians. Besides time it reports the peak extra memory of
one call: on a GPU measured with ``torch.cuda.max_memory_allocated``; on CPU the sizes
each way allocates (the unfolded (B, d, L) tensor, its (B*L, d) transposed copy and, for
bf16, the fp32 cast of x; ext: per thread, a d x d partial sum and one patch panel, as reported by
the extension), marked "est.".
Workloads: ``allcnn`` (CPU default): every distinct conv of AllCNN at width 96 and 48 on
32x32x3 inputs, ``--batch`` images; ``shapes``: AllCNN and ResNet-18 convs, batch 128.

    python benchmarks/bench_conv_covariance.py [--threads N] [--batch B] [--workload allcnn|shapes] [--quick] [--json out.json]
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


def unfold_bytes(x, rows: int, d: int) -> int:
    """What the plain way allocates: the (B, d, L) unfold output and its (B*L, d) copy, in
    fp32 (plus the fp32 cast of a low-precision x)."""
    cast = x.numel() * 4 if x.dtype != torch.float32 else 0
    return cast + 2 * rows * d * 4


def allcnn_shapes(batch: int, width: int) -> list:
    """The distinct conv covariances of AllCNN (unsc_fast.evaluation.models) on 32x32x3."""
    wide = 2 * width
    return [
        (f"AllCNN-{width} conv1 3->{width}", (batch, 3, 32, 32), 3, 1, 1),
        (f"AllCNN-{width} conv {width} 3x3", (batch, width, 32, 32), 3, 1, 1),
        (f"AllCNN-{width} conv {width} 3x3 s2", (batch, width, 32, 32), 3, 2, 1),
        (f"AllCNN-{width} conv {width}->{wide} 3x3", (batch, width, 16, 16), 3, 1, 1),
        (f"AllCNN-{width} conv {wide} 3x3", (batch, wide, 16, 16), 3, 1, 1),
        (f"AllCNN-{width} conv {wide} 3x3 s2", (batch, wide, 16, 16), 3, 2, 1),
        (f"AllCNN-{width} conv {wide} 3x3 p0", (batch, wide, 8, 8), 3, 1, 0),
        (f"AllCNN-{width} conv {wide} 1x1", (batch, wide, 6, 6), 1, 1, 0),
    ]


def kernel_label(label: str, shape, kernel: int, stride: int, padding: int) -> str:
    """"ext (shift)", "ext (panel)" or "ext (spectral)": which of the extension's CPU kernels ran
    (spectral only under ``UNSC_FAST_CONV_KERNEL=fast``)."""
    if label != "ext":
        return label
    from unsc_fast.ops.dispatch import conv_kernel_rule, load_extension

    chosen = load_extension().conv_covariance_kernel(list(shape), [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1],
                                                     conv_kernel_rule() == "fast")
    return f"ext ({chosen})"


def main(argv=None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--workload", choices=("allcnn", "shapes"), default=None,
                       help="allcnn: every AllCNN conv at width 96 and 48 (default on CPU)")
    extra.add_argument("--batch", type=int, default=256, help="images per call for --workload allcnn")
    extra.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default: fp32 on CPU, both on GPU)")
    known, rest = extra.parse_known_args(argv)
    args = harness.parse_args(__doc__.splitlines()[0], rest)
    device = args.device
    on_cpu = not device.startswith("cuda")
    backend = harness.cpu_extension_backend() if on_cpu else None
    backend = backend or "auto"
    label = harness.ours_label("conv_covariance_", device) if backend == "auto" else backend
    ours_is_reference = label.startswith("torch")
    workload = known.workload or ("allcnn" if on_cpu else "shapes")
    if workload == "allcnn":
        shapes = allcnn_shapes(known.batch, 96) + allcnn_shapes(known.batch, 48)
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    dtype_names = (known.dtypes or ("fp32" if on_cpu else "fp32,bf16")).split(",")
    rows = []
    totals = {"ours": 0.0, "torch": 0.0}
    for name, shape, kernel, stride, padding in shapes:
        batch, channels, height, width = shape
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        d, N = channels * kernel * kernel, batch * out_h * out_w
        for dtype_name in dtype_names:
            x = torch.randn(shape, device=device).to(DTYPES[dtype_name])
            C_ours = torch.zeros(d, d, device=device)
            C_torch = torch.zeros(d, d, device=device)
            run_ours = lambda: ops.conv_covariance_(C_ours, x, kernel, stride, padding, backend=backend)  # noqa: E731
            run_torch = lambda: plain_torch(C_torch, x, kernel, stride, padding)  # noqa: E731
            timed = harness.time_interleaved_ms({"ours": run_ours, "torch": run_torch}, device, args.warmup, args.repeat)
            (ours_min, ours_ms), (torch_min, torch_ms) = timed["ours"], timed["torch"]
            totals["ours"] += ours_ms
            totals["torch"] += torch_ms
            if not on_cpu:
                ours_mem = harness.format_bytes(harness.peak_extra_bytes(run_ours, device))
                torch_mem = harness.format_bytes(harness.peak_extra_bytes(run_torch, device))
            else:
                unfold = unfold_bytes(x, N, d)
                if ours_is_reference:
                    ours_bytes = unfold
                elif label == "ext":
                    from unsc_fast.ops.dispatch import conv_kernel_rule, load_extension

                    ours_bytes = load_extension().conv_covariance_workspace_bytes(
                        list(shape), [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1], 4,
                        conv_kernel_rule() == "fast"
                    )
                else:
                    ours_bytes = 0
                ours_mem = harness.format_bytes(ours_bytes, estimated=True)
                torch_mem = harness.format_bytes(unfold, estimated=True)
            flops = 2.0 * N * d * d
            rows.append({
                "shape": f"{name}: {tuple(shape)} k{kernel} s{stride} p{padding} (N={N}, d={d})",
                "dtype": dtype_name,
                "ours": kernel_label(label, shape, kernel, stride, padding),
                "ours ms min/med": f"{ours_min:.1f} / {ours_ms:.1f}",
                "unfold+addmm ms min/med": f"{torch_min:.1f} / {torch_ms:.1f}",
                "ours GFLOP/s": f"{flops / ours_ms / 1e6:.3g}",
                "unfold+addmm GFLOP/s": f"{flops / torch_ms / 1e6:.3g}",
                "ours peak": ours_mem,
                "unfold+addmm peak": torch_mem,
                "ratio (torch/ours)": f"{torch_ms / ours_ms:.2f}x",
            })
    rows.append({"shape": "total (sum of medians)", "ours ms min/med": f"{totals['ours']:.1f}",
                 "unfold+addmm ms min/med": f"{totals['torch']:.1f}",
                 "ratio (torch/ours)": f"{totals['torch'] / max(totals['ours'], 1e-9):.2f}x"})
    harness.finish(
        args,
        "conv_covariance_: C += P^T P over conv patches (ours vs F.unfold + addmm, same run)",
        ["shape", "dtype", "ours", "ours ms min/med", "unfold+addmm ms min/med", "ours GFLOP/s",
         "unfold+addmm GFLOP/s", "ours peak", "unfold+addmm peak", "ratio (torch/ours)"],
        rows,
        ["GFLOP/s counts 2*N*d^2 for both ways; ratio = median / median",
         "peak = extra memory of one call; on CPU 'est.' = the sizes each way allocates (unfold: "
         "(B,d,L) + its (B*L,d) copy; ext: per thread, a d x d partial sum + one patch panel (panel "
         "kernel) or one chunk of padded input and its products (shift kernel))",
         f"{args.repeat} interleaved repeats (ours, torch, ours, torch, ...) after {args.warmup} warm-up rounds; "
         f"{torch.get_num_threads()} threads"],
    )


if __name__ == "__main__":
    main()
