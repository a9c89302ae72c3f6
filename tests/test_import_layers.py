"""Imports run downhill: no module imports a package of a higher layer.

Every import in ``voxelfm/`` is read with ``ast`` (module level, inside functions and under
``TYPE_CHECKING``: a deferred import is still a dependency), resolved to the top-level
package it names, and checked against ``LAYERS`` (docs/contributing.md explains the order).
A package missing from ``LAYERS`` fails the test: placing it is a decision, not a default.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "voxelfm"

# Lowest first. A module may import its own package, its own layer, or any lower layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    # base: no voxelfm dependencies beyond each other; "voxelfm" is the package's __init__
    (
        *("voxelfm", "conventions", "errors", "utils", "volume"),
        *("hu", "splits", "label_table", "versions"),
    ),
    ("io",),  # reading and writing images
    ("store",),  # the canonical volume store
    ("ingest", "synth"),  # manifests, shards, summaries; the synthetic cohort
    ("models",),  # the vision transformer and its weights
    ("ssl",),  # self-distillation losses, crops, heads
    ("train",),  # the pretraining loop and export
    ("extract",),  # backbones (own and foreign) and embedding stores
    ("probes",),  # probes fitted on frozen features
    ("stats",),  # bootstrap, label efficiency, text metrics, plots
    ("evaluation",),  # task categories, runners, the report
    ("datasets",),  # public-dataset adapters; they suggest evaluation tasks (EvaluationTask)
    # entry points: the command line, the Python API, checks the Snakefile runs, tooling
    ("api", "cli", "__main__", "config_checks", "profiles", "devtools"),
)

# (importing module, imported module) -> why it may run uphill. Each entry must still be
# needed (see test_every_exception_is_still_needed).
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("voxelfm", "voxelfm.api"): (
        "PEP 562 facade: `voxelfm.load_backbone` etc. import the API (and torch) on first "
        "attribute access, so `import voxelfm` stays cheap for the Snakefile"
    ),
}

LAYER_OF = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level(module: str) -> str:
    """voxelfm.a.b -> a; voxelfm -> voxelfm."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(imported voxelfm module, line) for every import statement in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from voxelfm import api` names a module; `from voxelfm.x import f` does not.
                candidate = f"{source}.{alias.name}"
                found.append((candidate if is_module(candidate) else source, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "voxelfm"]


def all_imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, 'file:line') over the whole package."""
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported, line in imported_modules(path):
            rows.append((importer, imported, f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return rows


def test_every_package_has_a_layer():
    names = {top_level(module_name(path)) for path in PACKAGE.rglob("*.py")}
    missing = sorted(names - set(LAYER_OF))
    assert not missing, f"add {missing} to LAYERS in {Path(__file__).name} (and to the docs)"


def uphill_imports() -> list[tuple[str, str, str]]:
    uphill = []
    for importer, imported, where in all_imports():
        source, target = top_level(importer), top_level(imported)
        if source == target or (importer, imported) in EXCEPTIONS:
            continue
        if LAYER_OF.get(target, -1) > LAYER_OF.get(source, -1):
            uphill.append((importer, imported, where))
    return uphill


def test_imports_run_downhill():
    problems = [
        f"{where}: {importer} ({top_level(importer)}) imports {imported} "
        f"({top_level(imported)}, a higher layer)"
        for importer, imported, where in uphill_imports()
    ]
    assert not problems, "uphill imports:\n" + "\n".join(problems)


def test_packages_do_not_import_each_other():
    """No cycle between top-level packages, not even within one layer."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in all_imports():
        if (importer, imported) not in EXCEPTIONS and top_level(importer) != top_level(imported):
            graph.setdefault(top_level(importer), set()).add(top_level(imported))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(a for a in graph if reaches(a, a, {a}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_every_exception_is_still_needed():
    present = {(importer, imported) for importer, imported, _ in all_imports()}
    stale = sorted(set(EXCEPTIONS) - present)
    assert not stale, f"remove these from EXCEPTIONS, the import is gone: {stale}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from voxelfm.evaluation.tasks import EvaluationTask\n", "voxelfm.evaluation.tasks"),
        ("def f():\n    import voxelfm.cli\n", "voxelfm.cli"),
        ("from voxelfm import api\n", "voxelfm.api"),
        ("from .. import cli\n", "voxelfm.cli"),
        ("if TYPE_CHECKING:\n    from ..evaluation import run\n", "voxelfm.evaluation.run"),
    ],
)
def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    """The parser finds module-level, function-level, relative and TYPE_CHECKING imports,
    and reports one from the base layer to the top as uphill."""
    fake = tmp_path / "voxelfm"
    (fake / "errors").mkdir(parents=True)
    (fake / "evaluation").mkdir()
    for file in ("__init__.py", "cli.py", "api.py", "evaluation/__init__.py"):
        (fake / file).write_text("")
    (fake / "evaluation" / "tasks.py").write_text("")
    (fake / "evaluation" / "run.py").write_text("")
    (fake / "errors" / "__init__.py").write_text("")
    (fake / "errors" / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert [name for name, _ in imported_modules(fake / "errors" / "bad.py")] == [expected]
    assert [(i, t) for i, t, _ in uphill_imports()] == [("voxelfm.errors.bad", expected)]
