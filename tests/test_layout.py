"""The design card's rules: one-way dependencies, no circles, a core that names no layer above it, and no
top-level `pipelines`/`distributed` modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"cli.py"}  # the CLI is the composition root, like scripts/
LAYERS = ("videocache.pipelines", "videocache.distributed", "videocache.eval_vbench")
FORBIDDEN = (*LAYERS, "pipelines", "distributed")
# the repository's folders and the packages they are installed as (pyproject.toml's package-dir)
PACKAGES = {"videocache": "videocache", "pipelines": "videocache.pipelines", "distributed": "videocache.distributed",
            "eval_vbench": "videocache.eval_vbench"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.parts[1:])
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[rel.parts[0]], *parts])


def source_files(top: str) -> list[Path]:
    return [p for p in (ROOT / top).rglob("*.py") if not any(part.startswith("reference-") for part in p.parts)]


def imported_modules(path: Path, name: str | None = None) -> set[str]:
    """Every module a file (module `name`, by default from its path) imports, at module level or inside
    functions, relative imports resolved (for a `from M import n`, both M and M.n: n may be a submodule)."""
    name = name if name is not None else module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def string_constants(path: Path) -> list[str]:
    """The string literals of a file, docstrings left out (prose may name any layer; code may not)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_engine_never_imports_adapters_or_parallelism():
    offenders = {}
    for path in source_files("videocache"):
        if path.name in ENTRY_POINTS:
            continue
        bad = {m for m in imported_modules(path) if m.startswith(FORBIDDEN)}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def test_the_core_names_no_layer_above_it_in_a_string():
    """No string import (importlib, a module path kept in a table) of pipelines, distributed or eval_vbench."""
    offenders = {}
    for path in source_files("videocache"):
        if path.name in ENTRY_POINTS:
            continue
        bad = [s for s in string_constants(path) if any(layer in s for layer in LAYERS)]
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders


def test_pipelines_never_import_distributed_eval_tests_or_benchmarks():
    """pipelines/ is installed; tests/ and benchmarks/ are not (the preset generators import neither)."""
    above = ("videocache.distributed", "videocache.eval_vbench")
    for path in source_files("pipelines"):
        bad = {m for m in imported_modules(path) if m.startswith(above) or m.split(".")[0] in ("tests", "benchmarks")}
        bad |= {s for s in string_constants(path) if s.startswith(above)}
        assert not bad, (path, bad)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycles.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_no_import_circles():
    """The project's modules import each other without circles (function-level and TYPE_CHECKING imports
    included)."""
    files = {module_name(p): p for top in PACKAGES for p in source_files(top)}
    graph = {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}
    cycles = find_cycles(graph)
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]


def test_the_layout_checks_can_fail(tmp_path):
    """A circle through a TYPE_CHECKING import (what hooks -> engine was) and a string import are found."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    fake = tmp_path / "probe.py"
    fake.write_text('"""doc: videocache.pipelines is fine here."""\nimport importlib\n'
                    'from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import CacheEngine\n'
                    'importlib.import_module("videocache.pipelines.wan")\n')
    assert string_constants(fake) == ["videocache.pipelines.wan"]
    assert "videocache.engine" in imported_modules(fake, "videocache.probe")
    assert "videocache.engine" not in imported_modules(ROOT / "videocache" / "hooks.py")  # hooks is a leaf


def test_no_top_level_pipelines_or_distributed_module_installed():
    import importlib.util

    import videocache.pipelines

    assert importlib.util.find_spec("pipelines") is None or "videocache" not in str(importlib.util.find_spec("pipelines").origin)
    assert Path(videocache.pipelines.__file__).parent == ROOT / "pipelines"
