"""Every ```python block of README.md runs as written against the current API (issue 10.9).

Each block runs in a fresh namespace that first defines the names the README's prose
assumes (a small model with a ``features.0`` conv, loaders of labelled batches, ``x``/``y``,
a ``loss``, forget and remaining splits), in a scratch directory. A block that drifts from
the API fails here instead of in a reader's hands. The table of backends per op is checked
against what each op accepts.
"""
from __future__ import annotations

import re
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from unsc_fast import ops
from unsc_fast.ops import dispatch

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, dedented code) of every ```python fence, also those indented in lists."""
    return [
        (text.count("\n", 0, match.start()) + 1, textwrap.dedent(match.group("body")))
        for match in FENCE.finditer(text)
    ]


BLOCKS = python_blocks(README.read_text())


def preamble() -> dict:
    """The names README snippets take for granted, kept tiny so that each block runs in seconds."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        flatten=nn.Flatten(),
        classifier=nn.Linear(4 * 6 * 6, 5),
    ))
    images = torch.randn(40, 1, 6, 6)
    labels = torch.arange(40) % 5
    batches = [(images[i:i + 10], labels[i:i + 10]) for i in range(0, 40, 10)]
    forget = labels == 3
    x, y = batches[0]
    return {
        "torch": torch,
        "nn": nn,
        "model": model,
        "loader": batches,
        "remaining_loader": batches,
        "x": x,
        "y": y,
        "loss": nn.functional.cross_entropy(model(x), y),
        "x_f": images[forget], "y_f": labels[forget],
        "x_r": images[~forget], "y_r": labels[~forget],
    }


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "the extractor found too few ```python blocks: did the fences change?"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may save files
    namespace = preamble()
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - our own README


def backend_table(text: str) -> dict[str, set[str]]:
    """``{op: backends}`` from the README's table; a note in brackets after a backend
    (``ext (CPU tensors)``) is prose and ignored."""
    rows = re.findall(r"^\s*\| `ops\.(\w+)` \| ([^|]+) \|\s*$", text, re.M)
    return {op: {re.sub(r"\(.*?\)", "", b).strip() for b in backends.split(",")} for op, backends in rows}


def call(op: str, backend: str):
    C, x, G = torch.zeros(6, 6), torch.randn(8, 6), torch.randn(3, 6)
    U = torch.linalg.qr(torch.randn(6, 2))[0]
    calls = {
        "covariance_": lambda: ops.covariance_(C, x, backend=backend),
        "conv_covariance_": lambda: ops.conv_covariance_(torch.zeros(4, 4), torch.randn(1, 1, 3, 3), 2, backend=backend),
        "project_": lambda: ops.project_(G, U, backend=backend),
        "restrict_": lambda: ops.restrict_(G, U, backend=backend),
        "energy_basis": lambda: ops.energy_basis(x.T @ x, 0.9, backend=backend),
        "energy_bases": lambda: ops.energy_bases([x.T @ x], 0.9, backend=backend),
        "energy_bases_with_complements": lambda: ops.energy_bases_with_complements([x.T @ x], 0.9, backend=backend),
    }
    return calls[op]()


def test_readme_backend_table_matches_the_ops():
    table = backend_table(README.read_text())
    assert set(table) == set(ops.__all__) - {"complement_basis"}, "every public op has a row"
    for op, listed in table.items():
        assert listed <= set(dispatch.BACKENDS), (op, listed)
        for backend in dispatch.BACKENDS:
            if backend in listed:
                try:  # implemented; it may still be unavailable on this machine
                    call(op, backend)
                except RuntimeError as error:
                    assert re.search(r"not installed|needs CUDA|not built", str(error)), (op, backend, error)
            else:
                with pytest.raises(ValueError, match="is not implemented"):
                    call(op, backend)


def test_collect_then_exclude_an_int_label():
    """The README's ``# or: proj.collect(remaining_loader)`` then ``build(exclude=(3,))``:
    the loader's tensor labels are stored as ints, so the int 3 names them."""
    from unsc_fast import NullSpaceProjector

    names = preamble()
    proj = NullSpaceProjector(names["model"], threshold=0.99).collect(names["remaining_loader"])
    proj.build(exclude=(3,))
    assert proj.built_from == (0, 1, 2, 4)
    assert proj.basis("features.0").shape[0] == 9
