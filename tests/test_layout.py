"""The package layout's rules (../shared/DESIGN.md): no import cycle inside dicomnode/, and the lines not to
cross — read from the source with ``ast`` (every import, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dicomnode"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {t for t in _imports(path) if t in MODULES and t != name}
        # a package's __init__ always runs before its modules: an edge to an ancestor package is no cycle
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_dicomnode():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _imports_below(prefix: str) -> dict[str, set[str]]:
    return {name: _imports(path) for name, path in MODULES.items() if name == prefix or name.startswith(prefix + ".")}


@pytest.mark.parametrize("forbidden", ["torch", "dicomnode.classification.model", "dicomnode.classification.pipeline"])
def test_the_receive_path_never_imports_torch_or_the_model(forbidden):
    offenders = {m for m, imps in _imports_below("dicomnode.receive").items()
                 if any(i == forbidden or i.startswith(forbidden + ".") for i in imps)}
    assert not offenders, f"{forbidden} imported by {sorted(offenders)}"


def test_the_node_never_imports_the_trainer():
    offenders = {m for m, imps in _imports_below("dicomnode").items()
                 if m not in ("dicomnode.cli",) and any(i == "trainer" or i.startswith("trainer.") for i in imps)}
    assert not offenders, f"trainer imported by {sorted(offenders)}"


def test_the_database_layer_knows_nothing_of_pynetdicom():
    offenders = {m for m, imps in _imports_below("dicomnode.db").items()
                 if any(i == "pynetdicom" or i.startswith("pynetdicom.") for i in imps)}
    assert not offenders, f"pynetdicom imported by {sorted(offenders)}"


def test_classification_never_imports_the_receive_path():
    """The byte walk both stages need lives in dicomnode.part10; the classifier reads stored files, not the SCP."""
    offenders = {m for m, imps in _imports_below("dicomnode.classification").items()
                 if any(i == "dicomnode.receive" or i.startswith("dicomnode.receive.") for i in imps)}
    assert not offenders, f"dicomnode.receive imported by {sorted(offenders)}"
