"""Notebook prose quotes benchmark numbers from the recorded files, through labkit.lessons.recorded."""

from __future__ import annotations

import pytest

from labkit.lessons.recorded import RESULTS, ratio_line


def test_the_quoted_ratio_is_the_files_line() -> None:
    line = ratio_line("tp")
    assert line.startswith("Ratio tp / single") and "**" not in line
    assert f"**{line.split(':')[0]}" in (RESULTS / "tp-cpu.md").read_text()


def test_a_missing_result_names_the_command_that_makes_it() -> None:
    with pytest.raises(FileNotFoundError, match="labkit bench nothing --record"):
        ratio_line("nothing")
