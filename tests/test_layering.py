"""The package's stages and their direction (docs/architecture.md).

Static checks, from the source: every module of ``unsc_fast/`` belongs to one stage of
``STAGES``, imports only its own stage or the stages below it, and no set of modules imports
itself in a circle. Every import counts, also one inside a function or under
``TYPE_CHECKING``: a lazy import hides a circle from the interpreter, not from a reader.

Runtime checks, each in a fresh interpreter (so modules that other tests imported cannot
hide a violation): the core never imports the evaluation harness (nor scikit-learn /
matplotlib, which only the harness needs), and the Triton kernels import nothing from the core.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unsc_fast"

# Bottom first. A module may import modules of its own stage and of the stages before it in
# this list, never of a later one. A name covers a module and everything inside it.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("ops", ("unsc_fast.ops",)),
    ("training", ("unsc_fast.training",)),
    ("adapters", ("unsc_fast.adapters",)),
    ("tracking", ("unsc_fast.tracking",)),
    ("statistics", ("unsc_fast.statistics",)),
    ("solve", ("unsc_fast.solve",)),
    ("projection", ("unsc_fast.projection",)),
    ("distributed", ("unsc_fast.distributed",)),
    ("projector", ("unsc_fast.projector",)),
    ("procedure", ("unsc_fast.calibration", "unsc_fast.room", "unsc_fast.objectives", "unsc_fast.unlearning",
                   "unsc_fast.unlearn")),
    ("api", ("unsc_fast",)),  # the package root alone: the public names
    ("harness", ("unsc_fast.evaluation",)),
    ("cli", ("unsc_fast.__main__",)),
]
# Not modules of this source tree: the compiled extension and the Triton kernels (installed
# as unsc_fast.kernels from kernels/, checked below to import nothing from the core).
OUTSIDE = ("unsc_fast._C", "unsc_fast.kernels")


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package`` (``__init__`` as the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _known(name: str, modules: dict) -> str | None:
    """The module an import of ``name`` loads (its longest known prefix), None outside the tree."""
    if any(_within(name, outside) for outside in OUTSIDE):
        return None
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict) -> dict[str, int]:
    """The tree's modules that ``name`` imports, each with the line of its first import."""
    found: dict[str, int] = {}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from package import module`` imports that module (or the extension ``_C``);
            # ``from module import name`` the module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.append(full if full in modules or any(_within(full, o) for o in OUTSIDE) else base)
        for target in targets:
            known = _known(target, modules)
            if known is not None and known != name:
                found.setdefault(known, node.lineno)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def stage_of(name: str) -> int | None:
    """Index in ``STAGES`` of the most specific stage naming ``name`` (None: in no stage)."""
    best, length = None, -1
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            matches = name == prefix if prefix == "unsc_fast" else _within(name, prefix)
            if matches and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each as one circle path."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_circle(graph, set(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _circle(graph: dict, component: set) -> list[str]:
    """One import circle through the component: a path from its first module back to it."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt in component and nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return sorted(component)


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for name, targets in sorted(graph.items()):
        mine = stage_of(name)
        for target, line in sorted(targets.items()):
            theirs = stage_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{name} (stage {STAGES[mine][0]}) imports {target} (stage {STAGES[theirs][0]}) "
                                f"at line {line}")
    return problems


# ---------------------------------------------------------------- static: the module graph
def test_every_module_has_a_stage():
    missing = sorted(name for name in module_files() if stage_of(name) is None)
    assert not missing, f"modules in no stage (add them to STAGES and docs/architecture.md): {missing}"


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_each_module_imports_only_its_stage_or_below():
    problems = upward_imports(import_graph())
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The graph checks themselves, on a made-up tree: a lazy import inside a function closes
    one circle and is an upward import (solve -> projector); a relative import closes another."""
    root = tmp_path / "unsc_fast"
    for folder in ("solve", "projector"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from unsc_fast.projector.facade import Facade\n")
    (root / "solve" / "request.py").write_text("def later():\n    from unsc_fast.projector.facade import Facade\n")
    (root / "projector" / "facade.py").write_text("from unsc_fast.solve.request import later\nclass Facade: ...\n")
    (root / "solve" / "checks.py").write_text("from . import complement\n")
    (root / "solve" / "complement.py").write_text("from unsc_fast.solve import checks\n")
    graph = import_graph(root)
    assert graph["unsc_fast.solve.checks"] == {"unsc_fast.solve.complement": 1}  # the relative import
    assert sorted(cycles(graph)) == [
        ["unsc_fast.projector.facade", "unsc_fast.solve.request", "unsc_fast.projector.facade"],
        ["unsc_fast.solve.checks", "unsc_fast.solve.complement", "unsc_fast.solve.checks"],
    ]
    assert upward_imports(graph) == [
        "unsc_fast.solve.request (stage solve) imports unsc_fast.projector.facade (stage projector) at line 2"]


def test_architecture_doc_lists_the_stages_in_order():
    """docs/architecture.md's stage table names the same stages, bottom first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    documented = re.findall(r"^\| \d+ \| `([a-z_]+)` \|", text, flags=re.MULTILINE)
    assert documented == [name for name, _ in STAGES]


def test_no_module_over_400_lines():
    """Small modules with one job (the developer guide): a longer one is two modules."""
    long = {name: n for name, path in module_files().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


# ---------------------------------------------------------------- runtime: fresh interpreters
def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_core_imports_no_harness_and_no_eval_dependencies():
    done = _run(
        "import sys, unsc_fast\n"
        "from unsc_fast import NullSpaceProjector, NullSpaceOptimizer, ops\n"
        "import unsc_fast.unlearn, unsc_fast.distributed, unsc_fast.training, unsc_fast.calibration\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('unsc_fast.evaluation', 'sklearn', 'matplotlib', 'scipy')))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module", ["covariance", "conv_covariance", "projection"])
def test_kernels_import_nothing_from_the_core(module):
    """Imported as a top-level package straight from the source tree (not as
    ``unsc_fast.kernels``, whose parent package is the core), a kernel file must load with
    no ``unsc_fast`` module in sight."""
    pytest.importorskip("triton")
    done = _run(
        "import sys\n"
        f"import kernels.{module}\n"
        "core = sorted(m for m in sys.modules if m.startswith('unsc_fast'))\n"
        "assert not core, core\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr
