"""The layers import downwards only: library -> apps (client/, server/) -> simulations/.

Read from the source (``ast``), not by importing: every ``import`` / ``from ... import`` of
every ``.py`` file under ``fopro_kd/``, ``client/``, ``server/`` and ``simulations/`` counts,
at module level, inside functions, under ``if TYPE_CHECKING:`` and inside ``try:`` alike, plus
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. An import
hidden inside a function still makes the importer depend on the imported module, so a cycle
dodged that way is still a cycle.

Rules:

* ``fopro_kd`` (the library) imports neither ``flwr`` nor ``client``, ``server`` or
  ``simulations`` (one known violation is listed, exactly as for the next rule; Flower never);
* no import cycle among the project's modules (the failure names the cycle, file and line of
  each edge);
* no module under ``client/`` imports ``server/`` and none under ``server/`` imports
  ``client/``. That split is under way (issue 15): the test lists the violations that exist
  today and asserts that exactly those are found, so it fails when a new one appears *and*
  when one is removed without taking it off the list.

An edge goes to the most specific project module named: ``from a.b import c`` is an edge to
``a.b.c`` when that is a module, else to the package ``a.b``; ``import a.b.c`` to ``a.b.c``.
The parent packages that Python initialises on the way are not counted as edges (otherwise
every package ``__init__`` that re-exports a submodule would form a cycle with it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fopro_kd", "client", "server", "simulations")
LIBRARY_MUST_NOT_IMPORT = ("flwr", "client", "server", "simulations")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str  # a project module, or the top-level name of an external package
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=1)
def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``name`` that is a project module, else the external top-level name."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return parts[0]


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute ``from`` part of ``node`` (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module or external top-level name, line) of every import in ``tree``.

    ``from a.b import c``: ``a.b.c`` when that is a project module, else ``a.b``;
    ``import a.b.c`` and ``importlib.import_module("a.b.c")``: the longest project-module prefix.
    """
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((_resolve(alias.name, modules), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = _absolute(node, module, is_package)
            for alias in node.names:
                sub = f"{prefix}.{alias.name}" if prefix else alias.name
                found.append((sub if sub in modules else _resolve(prefix, modules), node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((_resolve(node.args[0].value, modules), node.lineno))
    return found


@lru_cache(maxsize=1)
def import_edges() -> tuple[Edge, ...]:
    """One edge per (importer, imported) pair, at the first line that makes it."""
    modules = project_modules()
    edges: dict[tuple[str, str], Edge] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = str(path.relative_to(REPO_ROOT))
        for target, line in sorted(imports_of(tree, module, path.name == "__init__.py", modules), key=lambda t: t[1]):
            if target and target != module:
                edges.setdefault((module, target), Edge(module, target, rel, line))
    return tuple(edges.values())


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One shortest cycle through the smallest-named module of a strongly connected component."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("not a cycle")  # pragma: no cover


def find_cycles(edges: tuple[Edge, ...]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        if edge.imported in modules:
            graph[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def visit(root: str) -> None:  # iterative Tarjan (no recursion limit on long chains)
        nonlocal counter
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(_cycle_in(c, graph) for c in components)


def _describe(cycle: list[str], edges: tuple[Edge, ...]) -> str:
    where = {(e.importer, e.imported): e.where() for e in edges}
    hops = [f"{a} -> {b} ({where[(a, b)]})" for a, b in zip(cycle, cycle[1:])]
    return " | ".join(hops)


# --------------------------------------------------------------------------- the walker itself


def test_the_walker_sees_function_level_relative_and_string_imports() -> None:
    source = (
        "import os\n"
        "from . import accounting\n"
        "from .sampling import PoissonBatchLoader\n"
        "if TYPE_CHECKING:\n"
        "    from fopro_kd.config import Config\n"
        "def f():\n"
        "    from fopro_kd.training import trainer\n"
        "    import importlib\n"
        "    return importlib.import_module('simulations.simulate')\n"
    )
    modules = project_modules()
    found = {name for name, _ in imports_of(ast.parse(source), "fopro_kd.privacy.local_dp", False, modules)}
    assert found == {"os", "fopro_kd.privacy.accounting", "fopro_kd.privacy.sampling", "fopro_kd.config",
                     "fopro_kd.training.trainer", "importlib", "simulations.simulate"}
    package = imports_of(ast.parse("from . import local_dp\nfrom .accounting import x\n"), "fopro_kd.privacy", True,
                         modules)
    assert {name for name, _ in package} == {"fopro_kd.privacy.local_dp", "fopro_kd.privacy.accounting"}
    assert _resolve("fopro_kd.training.trainer.LocalTrainer", modules) == "fopro_kd.training.trainer"
    assert _resolve("flwr.app", modules) == "flwr"
    assert _cycle_in({"a", "b", "c"}, {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}}) == ["a", "b", "a"]
    assert _cycle_in({"a", "b", "c"}, {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# --------------------------------------------------------------------------- the rules


KNOWN_LIBRARY_VIOLATIONS: list[tuple[str, str]] = []
"""Empty since site planning moved into the library (fopro_kd/federation/sites.py, issue 15 step 1)."""


def _exact_violations(found: list[tuple[str, str]], known: list[tuple[str, str]], rule: str) -> None:
    """Fail on a violation not in ``known`` and on a listed one that is gone (take it off the list)."""
    where = {(e.importer, e.imported): e.where() for e in import_edges()}
    new = [f"{a} -> {b} ({where[(a, b)]})" for a, b in found if (a, b) not in known]
    gone = [f"{a} -> {b}" for a, b in known if (a, b) not in found]
    assert not new and not gone, (
        f"{rule}: new violations {new or 'none'}; fixed but still listed (remove them from the list): {gone or 'none'}"
    )


def test_the_library_imports_neither_flower_nor_the_apps_nor_simulations() -> None:
    found = sorted({(e.importer, e.imported) for e in import_edges()
                    if _top(e.importer) == "fopro_kd" and _top(e.imported) in LIBRARY_MUST_NOT_IMPORT})
    assert not any(_top(b) == "flwr" for _, b in KNOWN_LIBRARY_VIOLATIONS)  # Flower: never, not even listed
    _exact_violations(found, KNOWN_LIBRARY_VIOLATIONS,
                      "the library (fopro_kd/) must not import flwr, client/, server/ or simulations/")


def test_there_is_no_import_cycle_among_project_modules() -> None:
    edges = import_edges()
    cycles = find_cycles(edges)
    assert cycles == [], "import cycles:\n" + "\n".join(_describe(c, edges) for c in cycles)


# Both empty since the protocol layer (fopro_kd/federation/) holds what both apps share (issue 15 step 1);
# the exact-list check stays so that any new client<->server import fails here.
KNOWN_CLIENT_TO_SERVER: list[tuple[str, str]] = []
KNOWN_SERVER_TO_CLIENT: list[tuple[str, str]] = []


@pytest.mark.parametrize(
    ("importer", "imported", "known"),
    [("client", "server", KNOWN_CLIENT_TO_SERVER), ("server", "client", KNOWN_SERVER_TO_CLIENT)],
    ids=["client-imports-server", "server-imports-client"],
)
def test_client_and_server_violations_are_exactly_the_known_ones(
    importer: str, imported: str, known: list[tuple[str, str]]
) -> None:
    """client/ and server/ must not import each other; the list holds today's violations (issue 15).

    Exact on purpose: a new violation fails, and so does a removed one that is still listed
    (take it off the list, so that it cannot come back unnoticed).
    """
    found = sorted({(e.importer, e.imported) for e in import_edges()
                    if _top(e.importer) == importer and _top(e.imported) == imported})
    _exact_violations(found, known, f"{importer}/ must not import {imported}/")


def test_the_library_cli_names_the_simulation_layer_for_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    """``fopro_kd.cli`` alone has no ``simulate`` (it would import Flower): one clear line says where it is."""
    from fopro_kd.cli import build_parser, main
    from simulations.cli import add_simulate_command

    assert main(["simulate", "--config", "configs/sim-demo.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fopro-kd: error: 'simulate' runs the Flower apps") and "simulations.cli" in err, err
    args = build_parser([add_simulate_command]).parse_args(["simulate", "--out", "runs/x"])
    assert args.func.__module__ == "simulations.cli" and args.out == "runs/x"
