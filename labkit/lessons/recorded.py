"""Numbers the notebooks quote from recorded benchmarks (``benchmarks/results/``), not typed.

A notebook that says "the benchmark measured ..." prints the line from the recorded result, so
the sentence cannot drift from the file when the benchmark is re-recorded.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RESULTS", "ratio_line"]

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def ratio_line(name: str, device: str = "cpu") -> str:
    """The bold ``**Ratio ...**`` line of ``benchmarks/results/<name>-<device>.md``, plain."""
    path = RESULTS / f"{name}-{device}.md"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `labkit bench {name} --record`")
    for line in path.read_text().splitlines():
        if line.startswith("**Ratio"):
            return line.replace("**", "")
    raise ValueError(f"{path} has no '**Ratio' line")
