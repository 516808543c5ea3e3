"""How much of the remaining data's input energy a request protects, adapted to the request.

No one threshold suits every request: digits classes forget in 1-3 epochs under 0.99 per-label
protection and lose remaining accuracy at 0.97, while on MNIST-1D a class's inputs share so much
with the others' that it does not forget at 0.99 within 30 epochs and needs 0.9-0.85. So the
protection is a ladder of thresholds (``LEVELS``), highest first, and a request starts at
``start`` (default 0.99): when forgetting stalls (``stopping``: no progress for ``patience``
checks) the run steps one level down; when the guard shows damage it backs off one level up and
never goes below that level again (the floor). Each level is a rebuild of the same request at
another threshold (cheap under the per-label criterion: the eigenvectors are reused).
"""
from __future__ import annotations

from typing import Callable, Sequence

LEVELS = (0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8)


class ProtectionSchedule:
    """The ladder of thresholds of one request; ``rebuild(threshold)`` installs a level."""

    def __init__(self, rebuild: Callable[[float], None] | None, levels: Sequence[float] = LEVELS,
                 start: float = 0.99) -> None:
        levels = sorted({float(t) for t in levels} | {float(start)}, reverse=True)
        if not all(0.0 < t <= 1.0 for t in levels):
            raise ValueError(f"protection levels must lie in (0, 1], got {levels}")
        self.rebuild, self.levels = rebuild, tuple(levels)
        self.start = self.index = self.levels.index(float(start))
        self.floor = len(self.levels) - 1  # the lowest level (largest index) still allowed

    @classmethod
    def off(cls) -> "ProtectionSchedule":
        """An unprojected run's: no threshold (``None`` in the trajectory and progress), nothing to move."""
        schedule = cls(None, (1.0,), 1.0)
        schedule.levels = ()
        return schedule

    @property
    def threshold(self) -> float | None:
        return self.levels[self.index] if self.levels else None

    @property
    def adaptive(self) -> bool:
        return self.rebuild is not None

    def lower(self) -> bool:
        """One level less protection, if the floor allows it (returns whether it moved)."""
        if not self.adaptive or self.index >= self.floor:
            return False
        self.index += 1
        self.rebuild(self.threshold)
        return True

    def back_off(self) -> None:
        """The remaining data paid at this level: go one level up and never below it again."""
        if not self.adaptive:
            return
        self.floor = max(self.index - 1, 0) if self.index > self.start else self.start
        target = max(min(self.index - 1, self.floor), 0)
        if target != self.index:
            self.index = target
            self.rebuild(self.threshold)
