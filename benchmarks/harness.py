"""Shared benchmark harness: timing, peak memory, the table, the JSON dump.

Every ``bench_<op>.py`` times "ours" (``unsc_fast.ops`` with ``backend="auto"``, i.e. the
Triton kernel on CUDA and the PyTorch reference on CPU, which the table says) beside the
plain-PyTorch way, in the same process and on the same inputs, and prints the ratio last.

Timing: CUDA events on a GPU, ``time.perf_counter`` on CPU; a few warm-up calls, then the
median of ``repeat`` calls. Peak memory: ``torch.cuda.max_memory_allocated`` above what
was allocated before the call on a GPU; on CPU there is no allocator counter, so the
benchmarks report an estimate of the extra buffers each way allocates, marked "est.".
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (CPU-friendly)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls before timing")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls (the median is reported)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeat is None:
        args.repeat = 3 if args.quick else 10
    return args


def progress(message: str) -> None:
    """A timestamped progress line on stderr (long benchmarks; the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeat: int) -> float:
    """Median wall time of one call of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.startswith("cuda"):
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_interleaved_ms(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeat: int) -> dict:
    """(min, median) wall time in ms of each of ``fns``, timed in turn within every repeat
    (A B A B ...), so that load on a shared machine hits every contender alike; the
    median resists the spikes, the min shows the undisturbed speed."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (min(values), statistics.median(values)) for name, values in samples.items()}


def cpu_extension_backend() -> str | None:
    """"ext" when the C++ extension is built (the CPU kernels to compare), else None."""
    from unsc_fast.ops.dispatch import extension_available

    return "ext" if extension_available() else None


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated by one call of ``fn`` above what was live before it (GPU only)."""
    if not device.startswith("cuda"):
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() - before


def format_bytes(count: float | None, estimated: bool = False) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            text = f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
            return text + (" est." if estimated else "")
        count /= 1024
    return "-"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return (platform.processor() or platform.machine()) + f" ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is optional
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def ours_label(op: str, device: str) -> str:
    """Which backend ``backend="auto"`` runs for ``op`` on ``device``, for the table."""
    from unsc_fast.ops.dispatch import resolve

    chosen = resolve(op, "auto", torch.device(device), ("triton", "torch"))
    if chosen == "torch":
        return "torch (reference: no CUDA/Triton here)" if not device.startswith("cuda") else "torch (reference)"
    return chosen


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict], notes: Sequence[str] = ()) -> None:
    """A plain-text table; ``rows`` are dicts keyed by ``columns``."""
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    for note in notes:
        print(f"  note: {note}")


def finish(args: argparse.Namespace, title: str, columns: Sequence[str], rows: Sequence[dict], notes: Sequence[str]) -> None:
    env = environment(args.device)
    notes = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}"] + list(notes)
    print_table(title, columns, rows, notes)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"title": title, "environment": env, "columns": list(columns), "rows": list(rows), "notes": notes}, handle, indent=2)
        print(f"  wrote {args.json}")
