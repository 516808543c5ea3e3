"""CovarianceStore: the one owner of the observed statistics.

For every key (a label, or a named group of samples) and every tracked layer it holds the
uncentred covariance ``sum a a^T`` of the layer's input rows and how many rows went into it.
A deletion request is answered from these sums alone (``kept_sum``): the remaining data's
covariance is the sum over the keys that stay, less any key whose samples are also inside
them (a sample-wise request observed separately). Observation adds to it, distributed code
pools it, the projector reads it; nobody else touches its dictionaries.

Memory: one ``d x d`` matrix per layer and key, except a sum added with ``factor=True`` (a
forget pass) of fewer rows than a quarter of its width, which is kept as its ``r x d`` factor
(``statistics.factored``). ``kept_sum`` adds keys one at a time into a single running sum, so
a build never holds more than one extra matrix per layer.
"""
from __future__ import annotations

import warnings
from typing import Hashable, Iterable

import torch

from unsc_fast.statistics.factored import FactoredSum, factored_if_worth

Key = Hashable


def normalise_key(key):
    """Labels arrive as ints, numpy ints or 0-d tensors; store them all as Python ints."""
    if isinstance(key, torch.Tensor):
        if key.numel() != 1:
            raise TypeError(f"a label must be a scalar, got a tensor of shape {tuple(key.shape)}")
        return key.item()
    if hasattr(key, "item") and callable(key.item) and type(key).__module__ == "numpy":
        return key.item()
    return key


def listed(keys) -> str:
    """Keys as the user wrote them: ``[3, 'all']``, ints unquoted, names quoted."""
    return "[" + ", ".join(sorted(map(repr, keys))) + "]"


def coordinate_energies(matrix: torch.Tensor) -> torch.Tensor:
    """The per-coordinate energies of a slot's statistics: the diagonal of a (d, d) or
    (groups, d, d) covariance, or a diagonal slot's (d,) counts themselves."""
    return matrix if matrix.dim() == 1 else matrix.diagonal(dim1=-2, dim2=-1)


def key_set(keys, argument: str) -> set:
    """``keys`` as a set of normalised keys: one label/name or an iterable of them."""
    if isinstance(keys, (str, int)) or isinstance(keys, torch.Tensor) and keys.dim() == 0:
        keys = (keys,)
    elif hasattr(keys, "item") and type(keys).__module__ == "numpy" and getattr(keys, "ndim", 1) == 0:
        keys = (keys,)
    try:
        return {normalise_key(k) for k in keys}
    except TypeError:
        raise TypeError(f"{argument} must be a label, a group name or an iterable of them, got {keys!r}") from None


class CovarianceStore:
    """Per-key, per-layer covariance sums and row counts, in one accumulation dtype."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        # The unit roundoff of the coarsest accumulation in the sums (None: ``dtype``'s); a
        # float64 store folded from float32 per-label sums keeps float32's.
        self.rounding: float | None = None
        self._matrices: dict[Key, dict[str, torch.Tensor]] = {}
        self._rows: dict[Key, dict[str, int]] = {}
        self.version = 0  # bumped by every change: a cached solve of this content is stale when it moves
        # Per layer, the coarsest dtype its input rows arrived in: two forwards of the same
        # sample round differently at that precision, which ``solve.checks`` must allow for.
        self.row_dtypes: dict[str, torch.dtype] = {}

    # ------------------------------------------------------------------ read
    @property
    def keys(self) -> list:
        """Observed keys, in the order they were first seen."""
        return list(self._matrices)

    def __bool__(self) -> bool:
        return bool(self._matrices)

    def rows(self, key: Key, name: str) -> int:
        """Rows accumulated for layer ``name`` under ``key`` (0 when none)."""
        return self._rows.get(key, {}).get(name, 0)

    def matrix(self, key: Key, name: str) -> torch.Tensor | None:
        """The stored sum of ``key`` for layer ``name`` (not a copy; a factored sum is
        materialised as a new matrix), or None."""
        stored = self._matrices.get(key, {}).get(name)
        return stored.dense() if isinstance(stored, FactoredSum) else stored

    def has(self, key: Key, name: str) -> bool:
        """Whether ``key`` holds statistics for layer ``name`` (without materialising them)."""
        return name in self._matrices.get(key, {})

    def diagonal(self, key: Key, name: str) -> torch.Tensor | None:
        """The diagonal of ``key``'s sum for layer ``name`` (a diagonal slot: the counts
        themselves), without materialising a factored sum; None when not observed."""
        stored = self._matrices.get(key, {}).get(name)
        if stored is None or isinstance(stored, FactoredSum):
            return None if stored is None else stored.diagonal()
        return coordinate_energies(stored)

    def factored(self, key: Key, name: str) -> bool:
        """Whether ``key``'s sum for layer ``name`` is kept as a factor."""
        return isinstance(self._matrices.get(key, {}).get(name), FactoredSum)

    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, FactoredSum) else t.numel() * t.element_size()
                   for per_layer in self._matrices.values() for t in per_layer.values())

    # ------------------------------------------------------------------ write
    def add(self, key: Key, name: str, delta: torch.Tensor, rows: int, *, factor: bool = False) -> None:
        """Add ``delta`` (rows^T rows of ``rows`` rows) to ``key``'s sum; the store may keep ``delta``.

        ``factor``: keep the sum as its factor where its rows are few (``statistics.factored``;
        for forget passes, which are only ever subtracted)."""
        self.version += 1
        per_layer = self._matrices.setdefault(key, {})
        counts = self._rows.setdefault(key, {})
        total_rows = counts.get(name, 0) + int(rows)
        stored = per_layer.get(name)
        if isinstance(stored, FactoredSum):
            stored = stored.add_to_(delta)  # delta is the observation's own buffer: summed into it
        elif stored is not None:
            stored = stored.add_(delta)
        else:
            stored = delta
        per_layer[name] = factored_if_worth(stored, total_rows) if factor else stored
        counts[name] = total_rows

    def factor_(self, keys: Iterable[Key]) -> None:
        """Keep the sums of ``keys`` as factors where their rows are few (forget passes that
        arrived dense: pooled across processes onto rank 0)."""
        for key in keys:
            per_layer = self._matrices.get(key, {})
            for name, stored in per_layer.items():
                if isinstance(stored, torch.Tensor):
                    per_layer[name] = factored_if_worth(stored, self.rows(key, name))

    def note_row_dtype(self, name: str, dtype: torch.dtype) -> None:
        """Layer ``name`` received rows in ``dtype``: keep the coarsest seen."""
        known = self.row_dtypes.get(name)
        if known is None or torch.finfo(dtype).eps > torch.finfo(known).eps:
            self.row_dtypes[name] = dtype

    def pop(self, key: Key, name: str) -> tuple[torch.Tensor | None, int]:
        """Remove and return ``(matrix, rows)`` of one key and layer (a factored sum materialised)."""
        self.version += 1
        matrix = self._matrices.get(key, {}).pop(name, None)
        rows = self._rows.get(key, {}).pop(name, 0)
        return (matrix.dense() if isinstance(matrix, FactoredSum) else matrix), rows

    def reset(self, keys: Iterable[Key] | None = None) -> None:
        """Forget ``keys`` (default: all)."""
        self.version += 1
        if keys is None:
            self.row_dtypes.clear()
        for key in self.keys if keys is None else list(keys):
            self._matrices.pop(key, None)
            self._rows.pop(key, None)

    def replace(self, matrices: dict, rows: dict) -> None:
        """Swap in a whole new content (distributed: after pooling onto one rank)."""
        self.version += 1
        self._matrices, self._rows = matrices, rows

    # ------------------------------------------------------------------ requests
    def kept_keys(self, observed: list, exclude: set, include, subtract: set, *, allow_unobserved: bool = False) -> list:
        """The keys a build sums: ``observed`` (in order), restricted to ``include``, less
        ``exclude`` and ``subtract``. A key named in the request but never observed is an
        error (the class meant to be forgotten would still be protected if it was observed
        under another name), unless ``allow_unobserved``."""
        named = exclude | subtract | (set(include) if include is not None else set())
        unknown = named - set(observed)
        if unknown:
            message = (
                f"build(): {listed(unknown)} were never observed; observed keys: {listed(observed)}"
            )
            if not allow_unobserved:
                raise ValueError(message + " (pass allow_unobserved=True to build anyway)")
            warnings.warn(message, UserWarning, stacklevel=4)
        candidates = observed if include is None else [k for k in observed if k in set(include)]
        kept = [k for k in candidates if k not in exclude and k not in subtract]
        if not kept:
            raise ValueError(
                f"build(): no key left after exclude={listed(exclude)}; observed: {listed(observed)}"
            )
        return kept

    def kept_sum(self, name: str, keys: Iterable[Key], subtract: Iterable[Key] = (), *,
                 shape: tuple[int, ...] | None = None, device: torch.device | None = None,
                 required: bool = True) -> torch.Tensor | None:
        """``sum_{k in keys} C_k - sum_{k in subtract} C_k`` for layer ``name``, as a new tensor.

        A running sum: one extra ``d x d`` matrix whatever the number of keys. With no data
        for ``name`` in ``keys``: an error when ``required``, else zeros of ``shape``
        (a rank that saw none of the layer's data still takes part in a reduction).
        """
        total = None
        for key in keys:
            part = self.matrix(key, name)
            if part is None:
                continue
            if total is None:
                total = part.to(device=device, copy=True) if device is not None else part.clone()
            else:
                total.add_(part.to(total.device))
        if total is None:
            if required:
                raise RuntimeError(
                    f"layer {name!r} saw no input under keys {list(keys)}: did its forward run inside "
                    "observe()? Leave it out with modules=[...] if the model never calls it"
                )
            total = torch.zeros(shape, dtype=self.dtype, device=device)
        for key in subtract:
            part = self._matrices.get(key, {}).get(name)
            if isinstance(part, FactoredSum):
                part.add_to_(total, alpha=-1.0)
            elif part is not None:
                total.sub_(part.to(total.device))
        return total

    def kept_rows(self, name: str, keys: Iterable[Key], subtract: Iterable[Key] = ()) -> int:
        return sum(self.rows(k, name) for k in keys) - sum(self.rows(k, name) for k in subtract)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> list[dict]:
        """One entry per key: its covariances and row counts, tensors only; a factored sum is
        saved as its factor under ``factors`` (exact: a load gives back the same sums)."""
        entries = []
        for key, per_layer in self._matrices.items():
            entry = {
                "key": key,
                "covariances": {n: t for n, t in per_layer.items() if not isinstance(t, FactoredSum)},
                "counts": {n: torch.tensor(c, dtype=torch.int64) for n, c in self._rows[key].items()},
            }
            factors = {n: t.factor for n, t in per_layer.items() if isinstance(t, FactoredSum)}
            if factors:
                entry["factors"] = factors
            entries.append(entry)
        return entries
