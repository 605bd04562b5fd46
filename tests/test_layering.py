"""Imports point down the layers of DESIGN.md, and no two packages import each other (directly or round a loop).

The imports are read from the source (every ``import`` and ``from … import``, function-local ones included; those
under ``if TYPE_CHECKING:`` only annotate and are left out). Each unit (a package or top-level module of splittune)
has a storey; a unit may import its own storey and those below. The twins show each check catches what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "splittune"

# top to bottom; a unit imports its own storey and those below it
STOREYS = [
    {"cli", "__init__"},  # the command; the package's face (the Python API, loaded on first use)
    {"bench", "plan", "privacy", "compare", "verify", "generation", "export", "api"},  # the studies and tools
    {"run", "deploy"},  # a run (assemble, loop, resume, summary); the served process
    {"engines"},  # where parties execute: this process, Ray actors
    {"schedules", "eval"},
    {"parties"},
    # the leaves: anything above may use them
    {"models", "data", "taps", "report", "averaging", "checkpoint", "rundir", "assets", "config_reference", "track"},
    {"config", "device"},  # the config's defense entries are the defenses' own settings
    {"defenses"},
    {"cut"},
    {"channels"},
    {"dpmath", "threads", "workers", "allocator"},  # the privacy math, the worker threads, the C allocator's settings
    {"wire", "errors", "version"},
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _typing_only(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for inner in node.body:
                lines.update(range(inner.lineno, inner.end_lineno + 1))
    return lines


def imports(src: Path = SRC) -> dict[str, set[str]]:
    """Every splittune module and the splittune modules (or names in them) it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = _typing_only(tree)
        targets = found.setdefault(name, set())
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets.update(f"{target}.{alias.name}" for alias in node.names)
                targets.add(target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
    return {m: {t for t in ts if t == "splittune" or t.startswith("splittune.")} for m, ts in found.items()}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def unit_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, targets in module_edges(edges).items():
        for b in targets:
            if unit(a) != unit(b):
                out.setdefault(unit(a), set()).add(unit(b))
    return out


def storey(u: str) -> int:
    for i, units in enumerate(STOREYS):
        if u in units:
            return i
    raise KeyError(u)


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Each import of a unit above the importer's storey, as ``importer -> imported``."""
    return sorted(f"{a} -> {b}" for a, bs in unit_edges(edges).items() for b in bs if storey(b) < storey(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module to module (a name imported from a module counts as that module); a module importing its own package's
    ``__init__`` (re-exports) is not a loop of design."""
    modules = set(edges)

    def owner(t: str) -> str:
        while t not in modules and "." in t:
            t = t.rpartition(".")[0]
        return t if t in modules else ""

    return {a: {o for t in ts if (o := owner(t)) and o != a and not a.startswith(o + ".")} for a, ts in edges.items()}


@pytest.fixture(scope="module")
def edges():
    return imports()


def test_every_unit_has_a_storey(edges):
    units = {unit(m) for m in edges}
    assert not units - set().union(*STOREYS), "place the new package in STOREYS (and in DESIGN.md's layering)"


def test_imports_point_down(edges):
    assert upward(edges) == []


def test_no_package_or_module_imports_round_a_loop(edges):
    assert cycles(unit_edges(edges)) == []
    assert cycles(module_edges(edges)) == []


def test_the_checks_catch_an_upward_import_and_a_loop(edges):
    """The twin: the wire importing the cut (as a helper that moved to the wrong place would) is caught both ways."""
    bad = {**edges, "splittune.wire.frames": edges["splittune.wire.frames"] | {"splittune.cut.chain.Chain"}}
    assert upward(bad) == ["wire -> cut"]
    assert cycles(unit_edges(bad)) == [["channels", "cut", "wire"]]
    loop = {**edges, "splittune.models.arch": edges["splittune.models.arch"] | {"splittune.models.partition.DTYPES"}}
    assert ["splittune.models.arch", "splittune.models.partition"] in cycles(module_edges(loop))
    assert upward(loop) == []  # a loop inside one package is no upward import: the cycle check is what finds it
