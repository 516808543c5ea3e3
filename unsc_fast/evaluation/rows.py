"""Which runs a comparison's tables and plots show, and in what order: the original model,
the retrained reference, then the methods as they ran. Shared by ``report`` and ``plots``."""
from __future__ import annotations

REFERENCE = "retrain"


def row_order(results: dict) -> list[str]:
    names = list(results["runs"])
    first = [name for name in ("original", REFERENCE) if name in names]
    return first + [name for name in names if name not in first]
