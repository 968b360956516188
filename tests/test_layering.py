"""The core's layers, checked from the source: who may import whom.

``labkit/parallel`` imports config, data, model, clip, timeline, memory and itself, never the launcher,
the trainer or anything a notebook uses; the process supervisor imports nothing of labkit; no
core module imports the notebook-facing packages (lessons, widgets, plots, exercises).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "labkit"
NOTEBOOK_FACING = ("lessons", "widgets", "plots", "exercises")
PARALLEL_MAY_IMPORT = ("parallel", "config", "data", "model", "clip", "timeline", "memory")


def labkit_imports(path: Path) -> set[str]:
    """The labkit submodules ``path`` imports (first component after ``labkit.``), anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "labkit" and len(parts) > 1:
                found.add(parts[1])
    return found


def core_files() -> list[Path]:
    return [
        p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in NOTEBOOK_FACING
    ]


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("parallel/*.py")), ids=lambda p: p.name)
def test_parallel_imports_only_the_layers_below(path):
    extra = labkit_imports(path) - set(PARALLEL_MAY_IMPORT)
    assert not extra, f"{path.name} imports labkit.{sorted(extra)}"


def test_supervisor_imports_nothing_of_training():
    assert labkit_imports(PACKAGE / "supervisor.py") == set()


def test_core_never_imports_notebook_code():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(labkit_imports(p) & set(NOTEBOOK_FACING))
        for p in core_files()
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from labkit.lessons.memory import zero_memory_formula\n")
    assert labkit_imports(probe) == {"lessons"}
