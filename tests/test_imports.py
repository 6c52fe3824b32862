"""The package's import graph: io is a pure format layer, and no module cycle exists.

Edges are read from the source with ``ast`` (function-level imports included, since those are
how a cycle usually hides), so the test does not depend on import order at run time. Imports under
``if TYPE_CHECKING:`` never run (they name types for annotations) and are not edges.
"""

import ast
from pathlib import Path

import flawmap

PACKAGE_ROOT = Path(flawmap.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """flawmap modules that module ``name`` imports anywhere in its source."""
    found = set()
    for node in _runtime_nodes(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from flawmap.x import y": y is a submodule or a name defined in flawmap.x
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield child
        yield from _runtime_nodes(child)


def test_io_imports_no_model_code():
    assert imported_modules("flawmap.io") <= {"flawmap.errors", "flawmap._version", "flawmap.outputs"}
    assert imported_modules("flawmap.outputs") <= {"flawmap.errors"}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets, as lists of module names."""
    visiting, done, cycles = [], set(), []

    def visit(node):
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node):] + [node])
            return
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    return cycles


def test_no_import_cycles_between_modules():
    """Including through package ``__init__`` files: ``from flawmap import __version__`` inside a
    module that ``flawmap/__init__`` imports is a cycle too."""
    cycles = find_cycles({name: imported_modules(name) for name in MODULES})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checks_can_fail():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert "flawmap.models" in imported_modules("flawmap.cli")  # a function-level import is seen


def test_listing_the_commands_imports_nothing_heavy():
    """``flawmap --help`` and ``--version`` import neither torch nor numpy (they took 4 s; now well under 1 s)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom flawmap.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as done:\n    assert done.code == 0\n"
        "heavy = [name for name in ('torch', 'numpy', 'scipy', 'PIL') if name in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "fit " in result.stdout, result.stderr
