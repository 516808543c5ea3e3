"""Streaming ``l x d`` sketches for statistics too wide for a ``d x d`` matrix (Frequent Directions'
structure, with a shrink that keeps more of the energy).

Why: a 25,088-wide classifier input costs 2.5 GB per fp32 covariance (5 GB in fp64); an
LLM's MLP input 0.5-0.8 GB per layer and group; a ResNet-18 369 MB per label. Like Frequent
Directions (Liberty 2013; Ghashami, Liberty, Phillips, Woodruff 2016) the sketch keeps ``B``
with at most ``capacity`` rows: new rows are appended, and a full buffer is shrunk through
its SVD to at most ``l`` rows. For the rows ``A`` seen so far,

    0 <= A^T A - B^T B   and   ||A^T A - B^T B||_2 <= shrunk

where ``shrunk`` sums, over the shrinks, the ``(l+1)``-th largest squared singular value of
the buffer (tracked exactly). ``SHRINK="truncate"`` (the default) keeps the top ``l``
directions of the buffer whole and drops the rest: every dropped part is PSD, so the bound
holds, and the sketch holds as much energy as ``l`` rows of the buffer can. Frequent
Directions' own shrink (``"fd"``) subtracts that value from every kept direction too, which
bounds ``shrunk`` by ``||A||_F^2 / (l + 1)`` but holds about half the energy on a flat
spectrum (measured on 20,000 power-law rows, d = 576, decay 0.5: 0.19 / 0.32 of the energy
at l = 8 / 32 against 0.39 / 0.58 for truncation, the optimum being 0.39 / 0.59): for an
energy threshold the energy held is what counts. Memory: ``capacity x d`` numbers (``2 l`` by
default; ``compact()`` brings a sketch at rest down to ``l`` rows).

Energy guarantee. Because ``B^T B <= A^T A`` (Loewner order), any basis ``U`` captures at
least as much of A's energy as of B's: ``tr(U^T A^T A U) >= tr(U^T B^T B U)``. ``basis``
therefore takes the smallest ``k`` top right singular vectors of ``B`` whose energy reaches
``threshold * ||A||_F^2`` (the exact trace, accumulated in fp64): the basis keeps at least
the threshold of the *true* energy. When the sketch holds too little energy for that (too
few rows ``l`` for a flat spectrum) it keeps every direction of ``B`` and warns with the
energy it can promise.

Sketches merge (stack two, shrink): the sum of the kept keys' sketches, or of the ranks'
sketches, is a sketch of the summed rows with the summed bounds. They cannot be subtracted
from: a request that removes samples from a kept key is refused on a sketched slot.
``from_covariance`` turns a ``d x d`` covariance into a sketch with the same guarantee (a
Nystrom approximation, which never exceeds the matrix it approximates).
"""
from __future__ import annotations

import math
import warnings

import torch

DEFAULT_ROWS = 256
NEGLIGIBLE = 1e-6  # singular values below this share of the largest hold < 1e-12 of its energy
SHRINK = "truncate"  # or "fd": Frequent Directions' subtraction (see the module docstring)
CHUNK_NUMBERS = 2**22  # rows are fed (and their energy summed in fp64) this many numbers at a time
MIN_BUFFER = 64  # a buffer holds at least this many rows beyond l (fewer, slower SVD calls)
# An update bringing more than this many buffers' worth of rows is first compressed to one
# buffer by a randomized range finder (``_range_rows``): one SVD instead of one per buffer.
COMPRESS_BUFFERS = 4
RANGE_POWER = 2  # power iterations of that range finder
RANGE_OVERSAMPLING = 8  # it keeps l + this many directions of the update


def buffer_rows(rows: int) -> int:
    """A small sketch's buffer: ``l`` rows plus room for ``max(l, MIN_BUFFER)`` new ones."""
    return rows + max(rows, MIN_BUFFER)


class FrequentDirections:
    """The sketch of one statistics block under one key: ``B`` (at most ``capacity`` rows, d),
    the exact energy ``trace = ||A||_F^2`` (fp64), the error bound ``shrunk`` and the row count."""

    def __init__(self, dim: int, rows: int = DEFAULT_ROWS, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None, capacity: int | None = None) -> None:
        if rows < 1:
            raise ValueError(f"a sketch needs at least one row, got {rows}")
        self.dim, self.dtype = int(dim), dtype
        self.l, self.capacity = int(rows), max(int(capacity or 2 * rows), int(rows) + 1)
        self.rows = torch.zeros(0, self.dim, dtype=dtype, device=device)
        self.trace = 0.0  # ||A||_F^2, fp64 on the host
        self.shrunk = 0.0  # sum of the shrink amounts: the spectral error bound
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows ``(n, d)`` of ``A``; they may be bf16/fp16 (sketched in ``dtype``).
        Raises ``ValueError`` on non-finite rows before changing anything."""
        rows = rows.reshape(-1, self.dim)
        step = max(1, CHUNK_NUMBERS // max(1, self.dim))
        energies = [float(chunk.to(torch.float64).square().sum()) for chunk in rows.split(step)]
        if not all(math.isfinite(e) for e in energies):
            raise ValueError("the rows have NaN or Inf entries")
        energy = sum(energies)
        self.trace += energy
        self.count += rows.shape[0]
        if SHRINK == "truncate" and rows.shape[0] > COMPRESS_BUFFERS * self.capacity and self.dim > self.capacity:
            rows = self._range_rows(rows, energy)
        start = 0
        while start < rows.shape[0]:
            if self.rows.shape[0] >= self.capacity:
                self._shrink(self.l)
            take = min(rows.shape[0] - start, self.capacity - self.rows.shape[0])
            self.rows = torch.cat([self.rows, rows[start : start + take].to(self.rows.device, self.dtype)])
            start += take

    def _range_rows(self, rows: torch.Tensor, energy: float) -> torch.Tensor:
        """``Q^T A`` (``l + RANGE_OVERSAMPLING`` rows) for the many rows ``A`` of one update, ``Q`` an orthonormal
        basis of A's dominant column space found by a seeded randomized range finder with
        ``RANGE_POWER`` power iterations (Halko, Martinsson, Tropp 2011, Alg. 4.4).

        Why: streaming n rows through a buffer of ``capacity`` costs ``n / (capacity - l)`` SVDs
        (a class sketch of 8 rows fed 2,048 conv patches per label and forward: 32 SVD calls
        per slot, most of a ResNet-18 observation). Whatever ``Q`` is, ``A^T Q Q^T A <= A^T A``
        (``Q Q^T <= I``), so the guarantee ``B^T B <= A^T A`` holds; what ``Q`` misses,
        ``||A||_F^2 - ||Q^T A||_F^2``, is added to ``shrunk`` (a bound on the spectral error).
        Float64 throughout, and the rows are scaled by ``1 - 4 ulp`` of ``dtype`` before they
        are rounded to it, as ``_shrink`` does. Not under ``SHRINK="fd"``, whose
        ``||A||_F^2 / (l + 1)`` bound on ``shrunk`` this looser term would break."""
        A = rows.to(self.rows.device, torch.float64)
        generator = torch.Generator(device=A.device).manual_seed(self.count)  # reproducible
        width = min(self.capacity, self.l + RANGE_OVERSAMPLING)
        omega = torch.randn(self.dim, width, generator=generator, dtype=torch.float64, device=A.device)
        q = torch.linalg.qr(A @ omega).Q
        for _ in range(RANGE_POWER):
            q = torch.linalg.qr(A @ (A.mT @ q)).Q
        compressed = q.mT @ A
        self.shrunk += max(0.0, energy - float(compressed.square().sum()))
        return (compressed * (1 - 4 * torch.finfo(self.dtype).eps)).to(self.dtype)

    def absorb(self, other: "FrequentDirections") -> None:
        """Merge ``other`` in: its rows, energy, bound and count (a sketch of both row sets)."""
        trace, shrunk, count = self.trace + other.trace, self.shrunk + other.shrunk, self.count + other.count
        self.update(other.rows)
        self.trace, self.shrunk, self.count = trace, shrunk, count

    def compact(self) -> "FrequentDirections":
        """At most ``l`` rows (the sketch at rest)."""
        if self.rows.shape[0] > self.l:
            self._shrink(self.l)
        return self

    def resize(self, rows: int) -> None:
        """Keep ``rows`` rows from now on (fewer: shrink now; the guarantee holds throughout)."""
        self.l = int(rows)
        self.capacity = buffer_rows(self.l)
        self.compact()

    def _shrink(self, keep: int) -> None:
        """The SVD runs in float64; the kept rows are scaled by ``1 - 4 ulp`` of ``dtype`` before
        they are rounded back to it, so that a thousand shrinks of float32 rows cannot creep
        above ``A^T A`` (measured: -2e-5 ||C|| without the margin, 1e-10 with it)."""
        _, s, vh = torch.linalg.svd(self.rows.double(), full_matrices=False)
        delta = float(s[keep]) ** 2 if s.numel() > keep else 0.0
        scaled = (s[:keep].square() - (delta if SHRINK == "fd" else 0.0)).clamp_min(0).sqrt()
        scaled = scaled * (1 - 4 * torch.finfo(self.dtype).eps)
        kept = int((scaled > 0).sum())
        self.rows = (scaled[:kept, None] * vh[:kept]).to(self.dtype).contiguous()
        self.shrunk += delta

    def snapshot(self) -> "FrequentDirections":
        """A twin to go back to: it shares ``rows``, which no method modifies in place (each
        update or shrink assigns a new tensor), so it costs no copy."""
        twin = FrequentDirections(self.dim, self.l, self.dtype, self.rows.device, self.capacity)
        twin.rows, twin.trace, twin.shrunk, twin.count = self.rows, self.trace, self.shrunk, self.count
        return twin

    def matrix(self) -> torch.Tensor:
        """``B``: the sketch rows in use."""
        return self.rows

    # persistence -------------------------------------------------------------
    def state(self) -> dict:
        return {"rows": self.rows, "trace": torch.tensor(self.trace, dtype=torch.float64),
                "shrunk": torch.tensor(self.shrunk, dtype=torch.float64),
                "count": torch.tensor(self.count, dtype=torch.int64),
                "l": torch.tensor(self.l, dtype=torch.int64), "capacity": torch.tensor(self.capacity, dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "FrequentDirections":
        rows = state["rows"]
        sketch = cls(rows.shape[1], int(state["l"]), rows.dtype, device, int(state["capacity"]))
        sketch.rows = rows.to(device, copy=True)
        sketch.trace, sketch.shrunk, sketch.count = float(state["trace"]), float(state["shrunk"]), int(state["count"])
        return sketch


def from_covariance(covariance: torch.Tensor, rows: int, count: int = 0, *, dtype: torch.dtype = torch.float32,
                    power: int = 1, oversampling: int = 8, generator: torch.Generator | None = None
                    ) -> FrequentDirections:
    """A sketch of ``rows`` rows with ``B^T B <= C`` from a ``d x d`` covariance ``C``.

    Nystrom: for any ``Q``, ``C Q (Q^T C Q)^+ Q^T C = C^{1/2} P C^{1/2} <= C`` (``P`` an
    orthogonal projector), so the bound holds whatever ``Q`` is; a power iteration makes
    ``Q`` span C's top directions, so that the ``rows`` kept hold most of its energy. Cost
    ``O(d^2 (rows + oversampling)(2 power + 1))``, no ``d^3`` eigendecomposition. The exact
    trace is kept; ``shrunk`` is ``tr(C) - ||B||_F^2`` (a valid, loose spectral bound)."""
    matrix = covariance.to(torch.float64)
    matrix = (matrix + matrix.T) / 2
    d = matrix.shape[0]
    sketch = FrequentDirections(d, rows, dtype, covariance.device)
    sketch.trace, sketch.count = float(matrix.diagonal().sum()), int(count)
    width = min(d, rows + oversampling)
    if width == 0 or sketch.trace <= 0:
        return sketch
    q = torch.randn(d, width, dtype=torch.float64, device=matrix.device, generator=generator)
    q = torch.linalg.qr(q).Q
    for _ in range(power):
        q = torch.linalg.qr(matrix @ q).Q
    y = matrix @ q
    del matrix
    core = q.T @ y
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    keep = values > max(float(values.max()), 0.0) * width * torch.finfo(torch.float64).eps
    if not bool(keep.any()):
        return sketch
    factor = (y @ vectors[:, keep]) / values[keep].sqrt()  # factor factor^T = Nystrom approximation
    left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    # B holds C's top directions almost whole, so rounding B to ``dtype`` could push B^T B a
    # few ulps of ||C|| above C there: a margin of 16 ulps keeps the bound on the right side
    singular = singular * (1 - 16 * torch.finfo(dtype).eps)
    sketch.rows = (singular[:rows, None] * left[:, :rows].T).to(dtype).contiguous()
    sketch.shrunk = max(0.0, sketch.trace - float(singular[:rows].square().sum()))
    return sketch


class SlotSketch:
    """The sketches of one statistics slot under one key: one per group (a dense slot has one)."""

    def __init__(self, dim: int, groups: int, rows: int, dtype: torch.dtype, device=None,
                 capacity: int | None = None) -> None:
        self.parts = [FrequentDirections(dim, rows, dtype, device, capacity) for _ in range(groups)]

    @classmethod
    def of(cls, parts: list[FrequentDirections]) -> "SlotSketch":
        sketch = cls.__new__(cls)
        sketch.parts = parts
        return sketch

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    @property
    def trace(self) -> float:
        return sum(part.trace for part in self.parts)

    @property
    def count(self) -> int:
        return self.parts[0].count

    def update(self, group: int | None, rows: torch.Tensor) -> None:
        self.parts[group or 0].update(rows)

    def snapshot(self) -> "SlotSketch":
        return SlotSketch.of([part.snapshot() for part in self.parts])

    def compact(self) -> "SlotSketch":
        for part in self.parts:
            part.compact()
        return self

    def resize(self, rows: int) -> None:
        for part in self.parts:
            part.resize(rows)

    def state(self) -> list[dict]:
        return [part.state() for part in self.parts]

    @classmethod
    def from_state(cls, state: list, device=None) -> "SlotSketch":
        return cls.of([FrequentDirections.from_state(part, device) for part in state])


def basis(sketches: list[FrequentDirections], threshold: float, name: str = "") -> torch.Tensor:
    """``(d, k)`` orthonormal basis keeping at least ``threshold`` of the true energy of the rows
    summed over ``sketches`` (see the module docstring for why this is a guarantee)."""
    stacked = torch.cat([s.matrix() for s in sketches]).double()
    trace = sum(s.trace for s in sketches)
    dim, dtype = sketches[0].dim, sketches[0].dtype
    if stacked.shape[0] == 0 or trace == 0.0:
        return torch.zeros(dim, 0, dtype=dtype, device=stacked.device)
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    energy = s.square().cumsum(0)
    reached = (energy >= threshold * trace).nonzero()
    if reached.numel():
        k = int(reached[0]) + 1
    else:
        k = int((s > s[0] * NEGLIGIBLE).sum())  # the rounding of float32 rows is no direction
        warnings.warn(
            f"layer {name!r}: its sketch holds {float(energy[-1]) / trace:.4f} of the energy, below the "
            f"threshold {threshold}; keeping all {k} sketched directions (raise the sketch rows)",
            UserWarning, stacklevel=3,
        )
    return vh[:k].T.contiguous().to(torch.float64)


def slot_basis(sketches: list[SlotSketch], threshold: float, name: str, grouped: bool) -> torch.Tensor:
    """A dense slot's ``(d, k)`` basis, or a grouped slot's ``(g, d, kmax)`` zero-padded bases
    (as ``Slot.solve`` pads them), from the summed sketches of its kept keys."""
    groups = len(sketches[0].parts)
    bases = [basis([s.parts[g] for s in sketches], threshold, name if groups == 1 else f"{name} (group {g})")
             for g in range(groups)]
    if not grouped:
        return bases[0]
    width = max(b.shape[1] for b in bases)
    padded = bases[0].new_zeros((groups, bases[0].shape[0], width))
    for index, part in enumerate(bases):
        padded[index, :, : part.shape[1]] = part
    return padded
