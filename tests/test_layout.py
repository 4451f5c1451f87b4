"""The design card's rules: one-way dependencies, and no top-level `pipelines`/`distributed` modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"cli.py"}  # the CLI is an entry point, like scripts/
FORBIDDEN = ("videocache.pipelines", "videocache.distributed", "videocache.eval_vbench", "pipelines", "distributed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_never_imports_adapters_or_parallelism():
    offenders = {}
    for path in (ROOT / "videocache").rglob("*.py"):
        if path.name in ENTRY_POINTS:
            continue
        bad = {m for m in imported_modules(path) if m.startswith(FORBIDDEN)}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def test_pipelines_never_import_distributed_eval_tests_or_benchmarks():
    """pipelines/ is installed; tests/ and benchmarks/ are not (the preset generators import neither)."""
    for path in (ROOT / "pipelines").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith(("videocache.distributed", "videocache.eval_vbench"))
               or m.split(".")[0] in ("tests", "benchmarks")}
        assert not bad, (path, bad)


def test_no_top_level_pipelines_or_distributed_module_installed():
    import importlib.util

    import videocache.pipelines

    assert importlib.util.find_spec("pipelines") is None or "videocache" not in str(importlib.util.find_spec("pipelines").origin)
    assert Path(videocache.pipelines.__file__).parent == ROOT / "pipelines"
