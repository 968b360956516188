"""The capstone panel of notebook 07, without a browser: set controls, run, the table grows."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.capstone import plot_challenge, wall_breakdown  # noqa: E402
from labkit.widgets.capstone import RESULT_COLUMNS, CapstonePanel  # noqa: E402


def small_panel(target: float = 3.5, **kwargs: object) -> CapstonePanel:
    """A panel whose tries take well under a second: nano model, 20 steps."""
    return CapstonePanel(target=target, steps=20, **kwargs)


def test_every_run_adds_a_row_and_changes_the_figure() -> None:
    panel = small_panel()
    assert panel.results.empty and panel.figure is None

    panel.update()
    assert list(panel.results.columns) == list(RESULT_COLUMNS)
    assert len(panel.results) == 1
    first = panel.results.iloc[0]
    assert first["try"] == 1 and first["strategy"] == "single" and first["world_size"] == 1
    assert first["steps"] == 20 and first["batch"] == 16
    assert first["final_val_loss"] == pytest.approx(panel.result.final_val_loss, abs=1e-4)
    assert first["wall_s"] > 0 and 0 < first["steps_s"] <= first["wall_s"] + 0.01
    signature = figure_signature(panel.figure)

    panel.lr.value = 1e-2
    panel.steps.value = 30
    panel.batch.value = 8
    panel.schedule.value = "cosine"
    panel.warmup.value = 4
    panel.update()
    assert len(panel.results) == 2
    second = panel.results.iloc[1]
    assert second["try"] == 2 and second["steps"] == 30 and second["batch"] == 8
    assert second["lr"] == pytest.approx(1e-2) and second["schedule"] == "cosine"
    # The settings reached the run itself, not only the table.
    cfg = panel.result.config
    assert (cfg.lr, cfg.steps, cfg.global_batch_size) == (pytest.approx(1e-2), 30, 8)
    assert (cfg.schedule, cfg.warmup_steps) == ("cosine", 4)
    assert int(panel.result.metrics["step"].max()) == 29
    assert figure_signature(panel.figure) != signature
    assert list(panel.curves) == ["#1 single x1", "#2 single x1"]
    assert "Try #2" in panel.message


def test_reached_compares_the_final_validation_loss_with_the_target() -> None:
    easy = small_panel(target=10.0)  # any run beats the loss of a uniform guess (about 4.6)
    easy.update()
    assert bool(easy.results.iloc[0]["reached"]) is True
    assert easy.best()["try"] == 1
    assert "reached the target" in easy.message

    hard = small_panel(target=0.5)  # far below what 20 steps of a nano model can reach
    hard.update()
    assert bool(hard.results.iloc[0]["reached"]) is False
    assert hard.best() is None
    assert "did not reach" in hard.message


def test_rejected_settings_give_a_message_and_leave_the_table_alone() -> None:
    panel = small_panel()
    panel.warmup.value = 100  # more warm-up steps than steps: TrainConfig rejects it
    panel.update()  # must not raise
    assert panel.result is None
    assert panel.results.empty and panel.figure is None
    assert "warmup_steps" in panel.message and "Not run" in panel.message
    assert "warmup_steps" in panel.status.value


def test_controls_keep_each_other_consistent() -> None:
    panel = small_panel()
    panel.strategy.value = "ddp"
    assert panel.world_size.value == 2  # data parallel needs two ranks to show anything
    panel.world_size.value = 3
    panel.strategy.value = "dp-bucketed"
    assert panel.world_size.value == 3  # an explicit choice is kept
    panel.strategy.value = "single"
    assert panel.world_size.value == 1
    panel.clip.value = "none"
    assert panel.max_norm.disabled
    panel.clip.value = "norm"
    assert not panel.max_norm.disabled
    settings = panel.settings()
    assert settings["strategy"] == "single" and settings["world_size"] == 1
    assert settings["global_batch_size"] == panel.batch.value
    assert settings["threads"] == 1 and settings["model"] == "nano"


def test_board_figure_and_wall_breakdown() -> None:
    curves = {
        "#1 single x1": pd.DataFrame({"step": [9, 19], "val_loss": [3.2, 2.9]}),
        "#2 ddp x2": pd.DataFrame({"step": [9, 19], "val_loss": [3.1, 2.5]}),
    }
    results = pd.DataFrame(
        {
            "try": [1, 2],
            "wall_s": [1.0, 5.0],
            "final_val_loss": [2.9, 2.5],
            "reached": [False, True],
        }
    )
    fig = plot_challenge(curves, results, target=2.6)
    curve_axes, board = fig.get_axes()
    assert len(curve_axes.get_lines()) == 3  # two tries and the target
    assert "fastest to target: #2" in [t.get_text() for t in board.get_legend().get_texts()]

    class Fake:
        info = {"wall_s": 5.0}
        metrics = pd.DataFrame({"rank": [0, 0, 1], "step": [0, 1, 0], "step_time_s": [1, 2, 9]})

    parts = wall_breakdown(Fake())
    assert parts == {"wall_s": 5.0, "steps_s": 3.0, "other_s": 2.0}  # rank 0's steps only


@pytest.mark.distributed
def test_a_data_parallel_try_matches_the_single_process_try() -> None:
    panel = small_panel()
    panel.update()  # single process
    panel.strategy.value = "ddp"  # world size follows: 2
    panel.update()
    assert panel.message.startswith("Try #2"), panel.message
    assert panel.result.info["world_size"] == 2
    assert set(panel.result.metrics["rank"]) == {0, 1}
    single, ddp = panel.results.iloc[0], panel.results.iloc[1]
    assert (ddp["strategy"], ddp["world_size"]) == ("ddp", 2)
    # The equivalence invariant: the same batches and updates, so the same validation loss.
    assert math.isclose(single["final_val_loss"], ddp["final_val_loss"], abs_tol=2e-4)
