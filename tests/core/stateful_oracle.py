"""The stateful test's own float64 model of what a projector holds, and the checks against it.

Written from the documented behaviour only (``NullSpaceProjector``'s docstrings): which key
each observed row goes under per statistics policy, which keys a build sums and subtracts,
when a request is valid, and what a basis built at a threshold must capture.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

FORGET = "forget"
TOTAL = "total"
REQUEST = "request"
EPS32 = torch.finfo(torch.float32).eps


class Capture:
    """The input rows every tracked layer receives in one forward, captured by hooks of the
    test's own (never the library's), as float64 rows in the layout the statistics use."""

    def __init__(self, model: nn.Module, names) -> None:
        self.model, self.names, self.rows, self.handles = model, list(names), {}, []

    def __enter__(self) -> "Capture":
        modules = dict(self.model.named_modules())
        for name in self.names:
            self.handles.append(modules[name].register_forward_hook(
                lambda module, args, output, name=name: self._record(name, module, args[0])))
        return self

    def _record(self, name, module, x) -> None:
        x = x.detach().double()
        if isinstance(module, nn.Conv2d):  # every kernel-sized patch, F.unfold's column order
            x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        self.rows[name] = x.reshape(-1, x.shape[-1]), x.shape[0]

    def sample_rows(self, name, index) -> torch.Tensor:
        rows, batch = self.rows[name]
        return rows.view(batch, -1, rows.shape[-1])[index].reshape(-1, rows.shape[-1])

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class Oracle:
    """Per key: float64 ``sum a a^T`` and row counts per layer, and the multiset of
    (sample, weights version) whose rows went in, which says whether a subtraction is inside."""

    def __init__(self, policy: str, names, sketched: bool = False) -> None:
        self.policy, self.names, self.sketched = policy, list(names), sketched
        self.sums: dict = {}
        self.rows: dict = {}
        self.samples: dict = {}
        # One total with a sketched layer: its sketches stay per label (or group, or forget
        # pass of a label), so those keys are observed too (docs/statistics.md)
        self.sketch_keys: set = set()

    def key(self, label, group, forget: bool):
        if self.policy == TOTAL:
            return FORGET if forget else TOTAL
        base = group if group is not None else label
        return (FORGET, base) if forget else base

    def add(self, capture: Capture, labels: list, group, forget: bool, sample_ids: list, version: int) -> None:
        for index, (label, sample) in enumerate(zip(labels, sample_ids)):
            if self.policy == TOTAL and self.sketched:
                base = group if group is not None else label
                self.sketch_keys.add((FORGET, base) if forget else base)
            key = self.key(label, group, forget)
            for name in self.names:
                rows = capture.sample_rows(name, index)
                sums = self.sums.setdefault(key, {})
                sums[name] = sums.get(name, 0) + rows.T @ rows
                counts = self.rows.setdefault(key, {})
                counts[name] = counts.get(name, 0) + rows.shape[0]
            self.samples.setdefault(key, Counter())[(sample, version)] += 1

    def drop(self, keys) -> None:
        for key in list(keys):
            for table in (self.sums, self.rows, self.samples):
                table.pop(key, None)
            self.sketch_keys.discard(key)

    @property
    def groups(self) -> set:
        return {k for k in [*self.sums, *self.sketch_keys] if not _is_forget(k)}

    @property
    def forget_keys(self) -> set:
        return {k for k in [*self.sums, *self.sketch_keys] if _is_forget(k)}

    def request(self, exclude: set, include, subtract: set) -> tuple[list, list, str | None]:
        """``(kept, subtracted, why it must be refused or None)`` as ``build`` documents it."""
        if self.policy == TOTAL:
            if (exclude or include is not None or subtract) and not self.forget_keys:
                return [], [], "needs a forget pass"
            return [TOTAL], sorted(self.forget_keys, key=repr), None
        named = exclude | subtract | (set(include) if include is not None else set())
        if named - self.groups:
            return [], [], "never observed"
        candidates = self.groups if include is None else self.groups & set(include)
        kept = sorted(candidates - exclude - subtract, key=repr)
        if not kept:
            return [], [], "no key left"
        inside = [k for k in self.forget_keys if k[1] in kept]
        return kept, sorted(subtract, key=repr) + sorted(inside, key=repr), None

    def inside(self, kept: list, subtracted: list) -> bool:
        """Every subtracted (sample, version) was observed under a kept key at least as often."""
        have = sum((self.samples.get(k, Counter()) for k in kept), Counter())
        take = sum((self.samples.get(k, Counter()) for k in subtracted), Counter())
        return all(have[item] >= count for item, count in take.items())

    def kept_sum(self, name: str, kept: list, subtracted: list) -> tuple[torch.Tensor, float, int]:
        """``(kept less subtracted, trace of the kept sum alone, rows on both sides)``."""
        before = sum(self.sums[k][name] for k in kept if name in self.sums.get(k, {}))
        removed = sum(self.sums[k][name] for k in subtracted if name in self.sums.get(k, {}))
        rows = sum(self.rows.get(k, {}).get(name, 0) for k in [*kept, *subtracted])
        return before - removed, float(torch.as_tensor(before).trace()), rows

    def remaining_rows(self, name: str, kept: list, subtracted: list) -> int:
        return (sum(self.rows.get(k, {}).get(name, 0) for k in kept)
                - sum(self.rows.get(k, {}).get(name, 0) for k in subtracted))


def _is_forget(key) -> bool:
    return key == FORGET or (isinstance(key, tuple) and key[0] == FORGET)


def sum_tolerance(rows: int, trace: float, dtype: torch.dtype) -> float:
    """How far a sum of ``rows`` products accumulated in ``dtype`` may be from float64."""
    return 16 * (rows + 1) * torch.finfo(dtype).eps * trace + 1e-300


def check_basis(name: str, basis: torch.Tensor, covariance: torch.Tensor, trace_before: float, rows: int,
                threshold: float, dtype: torch.dtype, exact_cut: bool = True) -> None:
    """``basis`` (d, k) is orthonormal and is the smallest basis holding ``threshold`` of the
    energy of ``covariance``, capturing as much of it as its top k eigenvectors do."""
    U = basis.double()
    k = U.shape[1]
    if k:
        assert float((U.T @ U - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-5, name
    tolerance = 2 * sum_tolerance(rows, trace_before, dtype) + 1e-5 * trace_before
    trace = float(covariance.trace())
    if trace <= tolerance:
        return  # nothing left to hold: any basis is as good as another
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0)
    captured = float((U.T @ covariance @ U).trace())
    assert captured >= threshold * trace - tolerance, (name, captured, threshold * trace)
    if exact_cut:
        assert captured >= float(eigenvalues[:k].sum()) - tolerance, (name, captured, eigenvalues[:k].sum())
        if k > 0:
            assert float(eigenvalues[: k - 1].sum()) < threshold * trace + tolerance, (name, k, eigenvalues)


def null_space_leak(weight: torch.Tensor, start: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """``(||dW U||, ||dW||)`` of the change of ``weight`` since ``start`` in float64."""
    change = (weight.detach().double() - start.double()).reshape(weight.shape[0], -1)
    return float((change @ basis.double()).norm()), float(change.norm())


def leak_bound(change_norm: float, start: torch.Tensor, steps: int) -> float:
    """Rounding a step may leave in the protected subspace: relative to the change, plus one
    float32 rounding of the weight per step (``W0 + P(W - W0)`` is rounded to float32)."""
    return 1e-5 * change_norm + 4 * max(steps, 1) * EPS32 * float(start.double().norm()) + 1e-30
