"""The shape of the code: no import cycles, and a pure core that never reaches the shell.

Imports are read from the source (module level and inside functions alike; ``if
TYPE_CHECKING:`` blocks are not imports at run time and are skipped), so a lazy import cannot
hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = {
    "rulecheck": ROOT / "rulecheck",
    "pytest_rulecheck": ROOT / "plugins" / "pytest_rulecheck",
}

# The pure core: functions over tensors and plain values, no files, no printing.
CORE = (
    "rulecheck.core",
    "rulecheck.errors",
    "rulecheck.config",
    "rulecheck.schema",
    "rulecheck.refs",
    "rulecheck.book",
    "rulecheck.bookdiff",
    "rulecheck.remap",
    "rulecheck.kinds",
    "rulecheck.strategies",
    "rulecheck.properties",
    "rulecheck.profiles",
    "rulecheck.heap",  # the garbage collector's policy: no files, no printing
)
# The shell around it, and libraries only the shell may use.
SHELL_LIBRARIES = ("yaml", "rich", "safetensors", "argparse", "json", "shutil", "tempfile")
# the shorthand's quoting rule is a JSON string literal: json as a string codec, not a file format
ALLOWED = {"rulecheck.refs": {"json"}}


def module_names() -> dict[str, Path]:
    out = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Run-time imports of a module: ``if TYPE_CHECKING:`` bodies are not visited."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module.split(".") if is_package else module.split(".")[:-1]
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node):
            self.generic_visit(node)
            return
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.names |= {alias.name for alias in node.names}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package[: len(self.package) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        self.names.add(base)
        self.names |= {f"{base}.{alias.name}" for alias in node.names}


def imported(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module ``module`` imports at run time (absolute names)."""
    visitor = _Imports(module, is_package)
    visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
    return visitor.names


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_names()
    edges = {}
    for name, path in modules.items():
        targets = imported(path, name, path.name == "__init__.py")
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def in_core(module: str) -> bool:
    """The root package (its version and error type) counts as core."""
    return module == "rulecheck" or any(module == c or module.startswith(c + ".") for c in CORE)


def test_modules_are_found(graph):
    assert {"rulecheck.api", "rulecheck.kinds.skipgram", "pytest_rulecheck"} <= set(graph)
    assert "rulecheck.book" in graph["rulecheck.rulebook"]  # edges are read


def test_no_import_cycle(graph):
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_imports_nothing_of_the_shell(graph):
    bad = {}
    for module, targets in graph.items():
        if in_core(module) and (shell := sorted(t for t in targets if not in_core(t))):
            bad[module] = shell
    assert not bad, bad


def test_the_core_uses_no_shell_library():
    modules = module_names()
    bad = {}
    for name, path in modules.items():
        if in_core(name):
            libs = {n.split(".")[0] for n in imported(path, name, path.name == "__init__.py")}
            if used := sorted((libs & set(SHELL_LIBRARIES)) - ALLOWED.get(name, set())):
                bad[name] = used
    assert not bad, bad


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
