"""What the kernel tests share: the device they run on, small-integer inputs (exact in fp32,
so kernel and reference must agree bit for bit), the fp32 error bound, and the memory probe
for the >2**31-element offset tests."""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_UNIT_ROUNDOFF = 2.0**-24
# A buffer just past 2**31 elements: offsets into it overflow int32.
LARGE_ELEMENTS = 2**31 + 2**20


def gamma(n: int) -> float:
    """Higham's gamma_n for fp32: a sum of n terms errs by at most gamma_n * sum |terms|."""
    return n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)


def small_integers(shape, dtype, low=-3, high=4, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=generator).to(dtype).to(DEVICE)


def available_memory_bytes() -> int:
    """Free memory on DEVICE (MemAvailable on CPU; 0 when it cannot be read)."""
    if DEVICE == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
