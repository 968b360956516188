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


def test_a_recorded_table_is_read_under_its_heading() -> None:
    from labkit.lessons.recorded import recorded_table

    table = recorded_table("pp", "## Bubble of pp-1f1b")
    assert list(table["m"]) == ["1", "2", "4", "8"]
    assert table["theory"].iloc[0] == "0.500"
    with pytest.raises(ValueError, match="no heading"):
        recorded_table("pp", "## Nothing like this")
