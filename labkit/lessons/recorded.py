"""Numbers the notebooks quote from recorded benchmarks (``benchmarks/results/``), not typed.

A notebook that says "the benchmark measured ..." prints the line from the recorded result, so
the sentence cannot drift from the file when the benchmark is re-recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RESULTS", "ratio_line", "recorded_path", "recorded_table"]

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def recorded_path(name: str, device: str = "cpu", suffix: str = "md") -> Path:
    """``benchmarks/results/<name>-<device>.<suffix>``; FileNotFoundError naming the command
    that records it when it is missing."""
    path = RESULTS / f"{name}-{device}.{suffix}"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `labkit bench {name} --record`")
    return path


def ratio_line(name: str, device: str = "cpu") -> str:
    """The bold ``**Ratio ...**`` line of ``benchmarks/results/<name>-<device>.md``, plain."""
    path = recorded_path(name, device)
    for line in path.read_text().splitlines():
        if line.startswith("**Ratio"):
            return line.replace("**", "")
    raise ValueError(f"{path} has no '**Ratio' line")


def recorded_table(name: str, heading: str, device: str = "cpu") -> pd.DataFrame:
    """The first markdown table under the heading that starts with ``heading`` in
    ``benchmarks/results/<name>-<device>.md``, as a DataFrame of strings."""
    import pandas as pd

    path = recorded_path(name, device)
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise ValueError(f"{path} has no heading starting with {heading!r}")
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    if len(rows) < 3:
        raise ValueError(f"{path}: no table under {heading!r}")
    return pd.DataFrame(rows[2:], columns=rows[0])  # rows[1] is the |---| line
