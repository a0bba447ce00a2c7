"""The package's layers: the library never imports the application, nothing imports in a
cycle, and no module imports jsa_fast inside a function (a lazy import hides a cycle).

Read from the source (ast), so that an import anywhere in a module counts, not only
those a test happens to run."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jsa_fast"

# What someone dropping the module into their own model depends on: it must not pull in
# the command lines, their configuration and their run-time plumbing.
LIBRARY = {
    "jsa_fast", "jsa_fast.reference", "jsa_fast.fused", "jsa_fast.ops", "jsa_fast.kernels",
    "jsa_fast.encoders", "jsa_fast.decoders", "jsa_fast.model", "jsa_fast.losses", "jsa_fast.maps",
    "jsa_fast.metrics", "jsa_fast.protocol", "jsa_fast.errors", "jsa_fast.settings", "jsa_fast.seeds",
    "jsa_fast.data",
}  # fmt: skip
APPLICATION = {
    "jsa_fast.config", "jsa_fast.runtime", "jsa_fast.checkpoint", "jsa_fast.distributed", "jsa_fast.viz",
    "jsa_fast.cli", "jsa_fast.entry_points", "jsa_fast.evaluation", "jsa_fast.train", "jsa_fast.evaluate", "jsa_fast.localize",
    "jsa_fast.prepare",
}  # fmt: skip


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the jsa_fast modules it imports, the imports made inside a function)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    lazy = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(inner) for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
            elif isinstance(node, ast.Import):
                found = {alias.name for alias in node.names}
            else:
                continue
            found = {target for target in found if target.split(".")[0] == "jsa_fast" and target in modules}
            targets |= found
            if found and id(node) in inside:
                lazy.append(f"{name}:{node.lineno}")
        graph[name] = targets - {name}
    return graph, lazy


def layer_of(name: str) -> str | None:
    for layer, members in (("library", LIBRARY), ("application", APPLICATION)):
        if any(name == member or name.startswith(member + ".") for member in members if member != "jsa_fast"):
            return layer
    return "library" if name == "jsa_fast" else None


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first repeated), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def problems(root: Path) -> list[str]:
    graph, lazy = imports(root)
    found = [
        f"{name} belongs to no layer: add it to LIBRARY or APPLICATION" for name in graph if layer_of(name) is None
    ]
    found += [
        f"library module {name} imports the application's {target}"
        for name, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(name) == "library" and layer_of(target) == "application"
    ]
    found += [f"an import of jsa_fast inside a function: {place}" for place in lazy]
    loop = cycle(graph)
    if loop:
        found.append("import cycle: " + " -> ".join(loop))
    return found


def test_library_imports_no_application_and_nothing_cycles() -> None:
    assert problems(PACKAGE) == []
    graph, _ = imports(PACKAGE)
    assert {"jsa_fast.fused", "jsa_fast.train", "jsa_fast.kernels.linear"} <= graph.keys()  # the walk saw them
    assert "jsa_fast.checkpoint" in graph["jsa_fast.evaluate"]


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        ("maps.py", "from jsa_fast.config import PRESETS\n", "library module jsa_fast.maps imports the application's jsa_fast.config"),
        ("cli.py", "from jsa_fast import train\n", "import cycle: "),
        ("metrics.py", "def later():\n    from jsa_fast import reference\n", "an import of jsa_fast inside a function: jsa_fast.metrics"),
        ("newmodule.py", "", "jsa_fast.newmodule belongs to no layer"),
    ],
)  # fmt: skip
def test_the_check_fails_when_a_layer_is_broken(tmp_path: Path, module: str, added: str, expected: str) -> None:
    copy = tmp_path / "jsa_fast"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    path = copy / module
    path.write_text((path.read_text() if path.exists() else "") + added)
    assert any(problem.startswith(expected) for problem in problems(copy)), problems(copy)
