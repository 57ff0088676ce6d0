"""tpmoe's modules import one way: kernel -> op -> module, never back up (issue 31, "always
downhill"). Read from the source, so it needs no built extension, Triton or transformers.

The rule: every import of a tpmoe module counts, at the top of a file or inside a function. A
function-level import only puts a circle off until the call; the two modules still lean on each
other, and routing <-> triton/ops, the circle this test was written for, was one. What does not
count is the import of a package that Python runs before a submodule of it (`tpmoe.cli` before
`tpmoe.cli.bench`): counting it would make a circle of every package whose __init__ re-exports
a submodule, Python's ordinary shape. `from tpmoe.x import name` counts as an import of the
submodule tpmoe.x.name where there is one, else of tpmoe.x.
"""
import ast
import pathlib
from typing import Dict, List, Set, Tuple
import support

ROOT = pathlib.Path(support.ROOT)
PACKAGE = ROOT / "tpmoe"


def module_files() -> Dict[str, Tuple[pathlib.Path, bool]]:
    """Module name -> (its file, whether it is a package's __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _known(name: str, modules) -> str:
    """The module that `name` names: itself, or the nearest package or module above it."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, modules) -> Dict[str, int]:
    """The tpmoe modules that `module` imports, each with the line of its first import."""
    path, is_package = modules[module]
    package = module if is_package else module.rpartition(".")[0]
    found: Dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "tpmoe" or target.startswith("tpmoe."):
                target = _known(target, modules)
                if target != module:
                    found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def import_cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """One circle per group of modules that reach each other (the strongly connected components
    of more than one module), as [a, b, ..., a]."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle_in(component, graph) for component in components]


def _circle_in(component: Set[str], graph) -> List[str]:
    """A shortest way from the component's first module back to itself (breadth first)."""
    start = min(component)
    came_from = {start: None}
    queue = [start]
    for node in queue:
        for target in sorted(graph[node]):
            if target == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return list(reversed(path)) + [start]
            if target in component and target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"no circle through {start} in {sorted(component)}")


def test_the_cycle_finder_finds_a_circle_and_names_it():
    """Not vacuous: a made-up graph with a circle of three and one way out is found as such."""
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b": 1}, "b": {}}) == []


def test_the_import_reader_sees_every_kind_of_import():
    """Relative, absolute and function-level imports of the real package are all read."""
    modules = module_files()
    assert "tpmoe.routing" in imports_of("tpmoe.block", modules)  # `from .routing import route`
    assert "tpmoe.triton.ops" in imports_of("tpmoe.routing", modules)  # inside `align`
    assert "tpmoe.routing_torch" in imports_of("tpmoe.triton.align", modules)  # `from ..routing_torch`


def test_no_import_circle_among_tpmoe_modules():
    modules = module_files()
    graph = {module: imports_of(module, modules) for module in modules}
    circles = import_cycles(graph)
    described = ["  " + " -> ".join(f"{a}:{graph[a][b]}" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"
                 for circle in circles]
    assert not circles, ("import circles in tpmoe, each import as module:line (move the shared piece down):\n"
                         + "\n".join(described))
