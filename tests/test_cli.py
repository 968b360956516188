"""The labkit command: trains, writes CSV, fails with one line on bad input."""

import subprocess
import sys

import pandas as pd
import pytest

from labkit.cli import main


def _labkit(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "labkit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_train_runs_and_writes_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    proc = _labkit(
        "train",
        "--model",
        "nano",
        "--steps",
        "6",
        "--global-batch-size",
        "4",
        "--progress",
        "false",
        "--csv",
        str(csv),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(csv)
    assert frame["step"].tolist() == list(range(6))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(frame.columns)
    assert "loss" in proc.stdout and "metrics written to" in proc.stdout


def test_bad_flag_is_one_line_not_a_traceback(tmp_path):
    for args in (["--world-size", "two"], ["--lr", "-3"], ["--strategy", "warp"]):
        proc = _labkit("train", *args, cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "error" in lines[0]


def test_help_shows_defaults(tmp_path):
    proc = _labkit("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--global-batch-size" in proc.stdout and "(default: 16)" in proc.stdout


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    # CI logs and pipes: no carriage-return frames, just a line now and then and one at the end.
    proc = subprocess.run(
        [sys.executable, "-m", "labkit", "train", "--model", "nano", "--steps", "40"]
        + ["--global-batch-size", "4", "--csv", str(tmp_path / "m.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("single:")]
    assert lines and lines[-1].startswith("single: 40/40 steps"), proc.stderr


def test_help_lists_every_preset_from_the_one_table(capsys):
    from labkit.parallel.presets import PRESETS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"{name}  " in text and preset.summary in text, name
    assert "--dp DP" in text and "--dp-impl DP_IMPL" in text and "zero3" in text
