"""``setup.py`` lists the packages it ships (``PACKAGES``): a subpackage missing there is left
out of a non-editable ``pip install .`` while every test, run from the source tree, still
passes. So every folder of ``unsc_fast/`` with an ``__init__.py`` must be listed."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_constant(name: str):
    """A literal assigned at the top level of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


def test_every_subpackage_is_shipped():
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "unsc_fast").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    listed = set(_setup_constant("PACKAGES"))
    assert folders - listed == set(), f"setup.py PACKAGES lacks {sorted(folders - listed)}"
    kernels = _setup_constant("PACKAGE_DIR")["unsc_fast.kernels"]
    assert "unsc_fast.kernels" in listed and (ROOT / kernels / "__init__.py").exists()
    assert listed - folders - {"unsc_fast.kernels"} == set(), "setup.py PACKAGES names folders that do not exist"
