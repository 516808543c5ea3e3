"""How much memory this process may give the statistics, read from the machine.

Why: the statistics' memory is chosen before the first batch (``unsc_fast.statistics.plan``),
and a default that ignores the machine either crashes (per-label covariances of a ResNet-18
need 369 MB per label) or wastes what a large machine offers. The default budget is
``DEFAULT_FRACTION`` of what is available where the statistics live:

* host tensors: the least of ``MemAvailable`` (``/proc/meminfo``), the room left under a
  cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and the room left
  under the address-space limit (``RLIMIT_AS``, ``ulimit -v``) above the current ``VmSize``;
* CUDA tensors: the free device memory (``torch.cuda.mem_get_info``).

A fraction, not all of it: the model, its activations, the optimizer and the data need the
rest. ``memory_budget=`` overrides the default; an explicitly requested policy is checked
against all of the available memory instead (it is refused only where it cannot fit at all).
"""
from __future__ import annotations

import os
import resource

import torch

DEFAULT_FRACTION = 1 / 8
_UNLIMITED = 2**62


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_field(path: str, field: str) -> int | None:
    """A ``kB`` field of a /proc file (``MemAvailable``, ``VmSize``), in bytes."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit, or None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < _UNLIMITED:
            return max(0, limit - usage)
    return None


def _address_space_room() -> int | None:
    """Bytes left under ``RLIMIT_AS`` above the current virtual size, or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _proc_field("/proc/self/status", "VmSize") or 0
    return max(0, soft - used)


def host_available() -> int:
    """Bytes of host memory this process can still use (see the module docstring)."""
    candidates = [_proc_field("/proc/meminfo", "MemAvailable"), _cgroup_room(), _address_space_room()]
    known = [c for c in candidates if c is not None]
    if known:
        return min(known)
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")  # not Linux: free pages
    return pages * size


def available(device: torch.device) -> int:
    """Bytes available for tensors on ``device`` (host memory for CPU tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available()


def default_budget(devices, fraction: float = DEFAULT_FRACTION) -> int:
    """``fraction`` of the memory available on the least roomy of ``devices``."""
    devices = {torch.device(d) for d in devices} or {torch.device("cpu")}
    return int(fraction * min(available(d) for d in devices))
