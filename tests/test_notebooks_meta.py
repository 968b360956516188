"""Fast checks over every committed notebook, without running them (nbval runs them).

A notebook is committed *executed*, so that it reads well on GitHub and nbval has outputs to
compare: every code cell ran (in order, top to bottom), no cell ended in an error, at least one
cell's printed output is checked by nbval, the first code cell sets up inline plots, and nothing in
the outputs leaks a path of the machine that executed it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))

# Paths that only exist on the machine that executed the notebook: home and work directories,
# temporary directories, Windows user folders.
LOCAL_PATH = re.compile(
    r"(?<![\w.])(/home/\w|/Users/\w|/root/|/work/|/tmp/|/private/var/|/var/folders/|[A-Za-z]:\\{1,2}Users\b)"
)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _code_cells(nb: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _output_texts(output: dict[str, Any]) -> list[str]:
    """The text of an output (streams, tracebacks, and every text-like mime type)."""
    texts = []
    if "text" in output:
        texts.append(_source({"source": output["text"]}))
    texts.extend(output.get("traceback", []))
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            texts.append(value if isinstance(value, str) else json.dumps(value))
    return texts


def test_the_workshop_notebooks_exist() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"00_tour.ipynb", "07_capstone.ipynb"} <= names, sorted(names)


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Each notebook as (file name, parsed JSON); a file that is not valid JSON fails here."""
    path: Path = request.param
    try:
        return path.name, _load(path)
    except json.JSONDecodeError as err:
        pytest.fail(f"{path.name} is not valid JSON: {err}")


def test_is_a_v4_notebook_with_the_standard_kernel(notebook: tuple[str, dict[str, Any]]) -> None:
    name, nb = notebook
    assert nb.get("nbformat") == 4, f"{name}: nbformat {nb.get('nbformat')}, expected 4"
    # nbval starts the kernel the notebook names: a private kernel name fails on CI.
    kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{name}: kernelspec {kernel!r}, expected 'python3'"


def test_was_executed_top_to_bottom(notebook: tuple[str, dict[str, Any]]) -> None:
    name, nb = notebook
    counts = [c.get("execution_count") for c in _code_cells(nb)]
    assert counts, f"{name} has no code cells"
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, f"{name}: code cells {missing} were never run (commit it executed)"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{name}: execution counts {counts} are out of order: restart and run all before committing"
    )


def test_has_no_error_outputs(notebook: tuple[str, dict[str, Any]]) -> None:
    name, nb = notebook
    for index, cell in enumerate(_code_cells(nb)):
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", (
                f"{name}: code cell {index} has an error output: {output.get('ename')}: "
                f"{output.get('evalue')}"
            )


def test_has_text_and_a_checked_cell(notebook: tuple[str, dict[str, Any]]) -> None:
    name, nb = notebook
    assert any(c["cell_type"] == "markdown" for c in nb["cells"]), f"{name}: no markdown cell"
    checked = [c for c in _code_cells(nb) if "# NBVAL_CHECK_OUTPUT" in _source(c)]
    assert checked, f"{name}: no cell marked '# NBVAL_CHECK_OUTPUT' (nbval-lax would check nothing)"
    for cell in checked:
        assert cell.get("outputs"), f"{name}: a NBVAL_CHECK_OUTPUT cell has no output to compare"


def test_first_code_cell_sets_up_inline_plots(notebook: tuple[str, dict[str, Any]]) -> None:
    name, nb = notebook
    first = _source(_code_cells(nb)[0])
    assert "%matplotlib inline" in first, f"{name}: the first code cell lacks %matplotlib inline"


def test_outputs_hold_no_local_paths(notebook: tuple[str, dict[str, Any]]) -> None:
    name, nb = notebook
    for index, cell in enumerate(_code_cells(nb)):
        for output in cell.get("outputs", []):
            for text in _output_texts(output):
                match = LOCAL_PATH.search(text)
                assert match is None, (
                    f"{name}: code cell {index} prints a local path near "
                    f"{text[max(0, match.start() - 40) : match.end() + 40]!r}"
                )


def test_local_path_pattern() -> None:
    """The detector itself: it must catch real leaks and leave URLs and package names alone."""
    leaks = ["/home/alice/lab", "see /tmp/labkit-run-x/rank0.log", "C:\\Users\\bob", "C:\\\\Users"]
    for leak in leaks:
        assert LOCAL_PATH.search(leak), leak
    for fine in ["https://example.org/home/x", "torch/optim/adamw.py", "a/b", "labkit.work/"]:
        assert LOCAL_PATH.search(fine) is None, fine
