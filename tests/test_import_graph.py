"""No import cycle among the project's modules, counting imports inside functions too (a lazy import
hides a cycle from Python, not from a reader)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Cycles someone chose to keep, each named (source, target), so that no new one slips in. None now:
# jobs <-> job_runs went when the SDK plumbing both used moved to rl_service/driver/job_client.py.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # The deepest project module the name refers to (a `from pkg import module` counts as the module).
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycles():
    files = [path for package in ("rl_service", "actors") for path in (REPO / package).rglob("*.py")]
    modules = {_module_name(path) for path in files}
    graph = {_module_name(path): _imports(path, modules) - {_module_name(path)} for path in files}
    for source, target in KNOWN_CYCLE_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from KNOWN_CYCLE_EDGES"
        graph[source].discard(target)
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name, targets in graph.items():
        graph[name] = {target for target in targets if not (target.startswith(name + ".") or name.startswith(target + ".")
                                                              and graph.get(target, set()) >= {name})}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)


def test_only_the_driver_package_and_the_cli_import_actors():
    """DESIGN.md "Layering": actors wrap the pure modules; the pure modules never reach back up."""
    files = [path for package in ("rl_service", "actors") for path in (REPO / package).rglob("*.py")]
    modules = {_module_name(path) for path in files}
    importers = {_module_name(path) for path in files if path.is_relative_to(REPO / "rl_service")
                 and any(target.startswith("actors") for target in _imports(path, modules))}
    assert importers, "no module imports actors/: the walk found nothing, so it checks nothing"
    outside = sorted(name for name in importers if not (name.startswith("rl_service.driver.") or name == "rl_service.cli"))
    assert outside == [], f"{outside} import actors/; only rl_service.driver.* and rl_service.cli may"
