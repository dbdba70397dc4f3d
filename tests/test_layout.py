"""The project's layering, read from the source with `ast`: no import cycles, and llmproxy/ free of mitmproxy."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llmproxy", "addons")


def project_modules() -> dict[str, Path]:
    """Every module of PACKAGES by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path, module_level: bool) -> set[str]:
    """The dotted names `module` imports, each a module or a name in one; with `module_level`, only the imports
    that run when it is imported (not those inside functions or under `if TYPE_CHECKING`)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per further dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names.update(f"{base}.{alias.name}" for alias in node.names)
            elif module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            elif module_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at module level."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path, module_level=True):
            # `from a.b import c` imports module a.b.c if there is one, else the name c of a.b
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None if it has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_find_cycle_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imported_names_at_module_level(tmp_path):
    (tmp_path / "__init__.py").write_text(
        "import a.b\nfrom . import c\nfrom ..d import e\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import f\nelse:\n    import g\n"
        "try:\n    import h\nexcept ImportError:\n    h = None\n"
        "def later():\n    import i\n"
        "class K:\n    import j\n    def method(self):\n        import k\n"
    )
    path = tmp_path / "__init__.py"
    assert imported_names("p.q", path, module_level=True) == {
        "a.b",
        "p.q.c",
        "p.d.e",
        "typing.TYPE_CHECKING",
        "g",
        "h",
        "j",
    }
    assert imported_names("p.q", path, module_level=False) >= {"f", "i", "k"}


def test_the_project_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_llmproxy_imports_neither_mitmproxy_nor_the_addons():
    for module, path in project_modules().items():
        if module.startswith("llmproxy"):
            imported = imported_names(module, path, module_level=False)
            assert not {name.partition(".")[0] for name in imported} & {"mitmproxy", "addons"}, module


def test_the_store_package_leaves_the_redis_client_unimported():
    """Only deployments with Redis need its client: importing llmproxy.store must not load it."""
    code = "import sys, llmproxy.store; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
