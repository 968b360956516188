"""Notebook 04's pieces without a browser: the schedule simulator, the figures, the sweep helper
and the pipeline panel (set controls, run, the figure and the tries change; bad input gives a
message, not an exception).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labkit.lessons.pipeline import (  # noqa: E402
    PIPELINE,
    run_pipelines,
    simulate_schedule,
    stage_table,
    sweep_table,
)
from labkit.lessons.pipeline_timeline import bubble_fraction, peak_activations  # noqa: E402
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.pipeline import (  # noqa: E402
    plot_bubble_sweep,
    plot_gantt,
    plot_gantts,
    plot_pipeline_try,
)
from labkit.widgets.pipeline import TRY_COLUMNS, PipelinePanel  # noqa: E402

# Fast runs for the tests: the nano GPT, two steps (the bubble skips the first), 8 sequences.
FAST = dict(model="nano", steps=2, global_batch_size=8, eval_every=0, eval_batches=1)


# ---------------------------------------------------------------------------------------------
# The simulator: the schedules on paper
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["pp-gpipe", "pp-1f1b"])
@pytest.mark.parametrize(("m", "p"), [(1, 2), (4, 2), (8, 2), (3, 4), (6, 4)])
def test_simulated_bubble_is_the_formula(schedule: str, m: int, p: int) -> None:
    timeline = simulate_schedule(schedule, m, p)
    assert len(timeline) == 2 * m * p  # one forward and one backward per micro-batch and stage
    bubble = bubble_fraction(timeline)
    assert bubble["bubble"].tolist() == pytest.approx([(p - 1) / (m + p - 1)] * p)
    assert bubble["theory"].iloc[0] == pytest.approx((p - 1) / (m + p - 1))
    # The step lasts (m + p - 1) forward+backward slots (1 + 2 time units each).
    assert timeline["end_s"].max() == pytest.approx(3 * (m + p - 1))


def test_simulated_activation_peaks_gpipe_against_1f1b() -> None:
    m, p = 6, 4
    gpipe = peak_activations(simulate_schedule("pp-gpipe", m, p))["peak"].tolist()
    one_f_one_b = peak_activations(simulate_schedule("pp-1f1b", m, p))["peak"].tolist()
    assert gpipe == [m] * p
    assert one_f_one_b == [min(m, p - s) for s in range(p)] == [4, 3, 2, 1]


def test_simulated_timeline_respects_the_dependencies() -> None:
    tl = simulate_schedule("pp-1f1b", 4, 3).set_index(["phase", "rank", "micro_batch"])
    for i in range(4):
        for s in range(1, 3):  # a forward starts after the previous stage's forward ended
            assert tl.loc[("forward", s, i), "start_s"] >= tl.loc[("forward", s - 1, i), "end_s"]
        for s in range(2):  # a backward starts after the next stage's backward ended
            assert tl.loc[("backward", s, i), "start_s"] >= tl.loc[("backward", s + 1, i), "end_s"]


def test_a_deadlocking_schedule_is_reported() -> None:
    def backwards_first(n_micro: int, stage: int, n_stages: int) -> list[tuple[str, int]]:
        return [("B", i) for i in range(n_micro)] + [("F", i) for i in range(n_micro)]

    with pytest.raises(ValueError, match="deadlocks"):
        simulate_schedule(backwards_first, 2, 2)


def test_stage_table_covers_every_layer_once() -> None:
    table = stage_table("small", world_size=2)
    layers = [name for row in table["layers"] for name in row.split(", ")]
    assert layers == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert (table["parameters"] > 0).all()


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def test_gantt_draws_one_bar_per_event_and_differs_by_schedule() -> None:
    gpipe, one_f_one_b = simulate_schedule("pp-gpipe", 4, 2), simulate_schedule("pp-1f1b", 4, 2)
    fig = plot_gantt(gpipe)
    (ax,) = fig.get_axes()
    assert len(ax.patches) == len(gpipe)
    assert "bubble 0.20 simulated" in fig.get_suptitle()
    assert figure_signature(fig) != figure_signature(plot_gantt(one_f_one_b))
    both = plot_gantts({"GPipe": gpipe, "1F1B": one_f_one_b})
    assert len(both.get_axes()) == 2
    # One shared time axis, so that chart lengths compare.
    assert both.get_axes()[0].get_xlim() == both.get_axes()[1].get_xlim()


def test_bubble_sweep_figure_draws_each_schedule() -> None:
    rows = []
    for schedule in ("pp-gpipe", "pp-1f1b"):
        for m in (1, 2, 4):
            for rank in (0, 1):
                peak = m if schedule == "pp-gpipe" else min(m, 2 - rank)
                rows.append(
                    {
                        "schedule": schedule,
                        "micro_batches": m,
                        "rank": rank,
                        "bubble": 1 / (m + 1) + 0.02,
                        "peak_sequences": peak * 48 // m,
                    }
                )
    fig = plot_bubble_sweep(pd.DataFrame(rows))
    left, right = fig.get_axes()
    labels = [line.get_label() for line in left.get_lines()]
    assert "GPipe, measured" in labels and "1F1B, measured" in labels
    gpipe_memory, one_f_one_b_memory = right.get_lines()
    assert list(gpipe_memory.get_ydata()) == [48, 48, 48]  # the whole batch, whatever m
    assert list(one_f_one_b_memory.get_ydata()) == [48, 48, 24]


# ---------------------------------------------------------------------------------------------
# The panel: controls and validation (no process is started)
# ---------------------------------------------------------------------------------------------


def test_naive_pins_the_slider_to_one_micro_batch() -> None:
    panel = PipelinePanel(schedule="pp-1f1b", micro_batches=4)
    assert panel.settings()["strategy"] == "pp-1f1b" and panel.settings()["micro_batches"] == 4
    assert panel.micro_batches.continuous_update is False
    panel.schedule.value = "naive"
    assert panel.micro_batches.value == 1 and panel.micro_batches.disabled
    settings = panel.settings()
    assert (settings["strategy"], settings["micro_batches"]) == ("pp-gpipe", 1)
    assert settings["world_size"] == 2 and settings["threads"] == 2
    assert settings["model"] == PIPELINE["model"]
    panel.schedule.value = "pp-gpipe"
    assert not panel.micro_batches.disabled


def test_micro_batches_that_do_not_divide_the_batch_give_a_message() -> None:
    panel = PipelinePanel(micro_batches=4, **FAST)
    panel.micro_batches.value = 3  # 8 sequences do not split into 3 micro-batches
    panel.update()  # must not raise
    assert panel.result is None and panel.figure is None
    assert panel.tries.empty and list(panel.tries.columns) == list(TRY_COLUMNS)
    assert "Not run" in panel.message and "micro_batches=3" in panel.message
    assert "micro_batches" in panel.status.value
    assert not panel.button.disabled


# ---------------------------------------------------------------------------------------------
# Real two-process runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_panel_runs_redraws_and_records_each_try() -> None:
    panel = PipelinePanel(schedule="pp-1f1b", micro_batches=4, **FAST)
    panel.update()
    assert panel.result is not None, panel.message
    cfg = panel.result.config
    assert (cfg.strategy, cfg.micro_batches, cfg.world_size) == ("pp-1f1b", 4, 2)
    first = panel.tries.iloc[0]
    assert first["theory"] == pytest.approx(1 / 5)
    assert 0 < first["bubble"] < 1 and first["step_ms"] > 0
    assert first["peak"] == 2  # 1F1B: stage 0 holds at most p = 2 micro-batches
    assert "1F1B, m=4" in panel.message
    signature = figure_signature(panel.figure)

    panel.schedule.value = "naive"
    panel.update()
    assert panel.result.config.micro_batches == 1
    assert len(panel.tries) == 2
    second = panel.tries.iloc[1]
    assert second["schedule"] == "naive" and second["theory"] == pytest.approx(0.5)
    assert second["peak"] == 1
    assert figure_signature(panel.figure) != signature
    assert "try #2" in panel.figure.get_suptitle()

    # A rejected setting afterwards keeps the last figure and the tries.
    kept = figure_signature(panel.figure)
    panel.schedule.value = "pp-gpipe"
    panel.micro_batches.value = 3
    panel.update()
    assert panel.result is None and len(panel.tries) == 2
    assert figure_signature(panel.figure) == kept


@pytest.mark.distributed
def test_run_pipelines_shares_one_start_up_and_matches_the_schedules() -> None:
    runs = run_pipelines(
        {
            "GPipe, m=2": dict(strategy="pp-gpipe", micro_batches=2),
            "1F1B, m=2": dict(strategy="pp-1f1b", micro_batches=2),
        },
        progress=False,
        **FAST,
    )
    assert list(runs) == ["GPipe, m=2", "1F1B, m=2"]
    # The same batches and the same updates: both schedules end with the same weights.
    worst = runs["GPipe, m=2"].compare(runs["1F1B, m=2"])["relative_difference"].max()
    assert worst <= 1e-5
    table = sweep_table(runs).set_index(["run", "rank"])
    assert table.loc[("GPipe, m=2", 0), "peak"] == 2 and table.loc[("GPipe, m=2", 1), "peak"] == 2
    assert table.loc[("1F1B, m=2", 0), "peak"] == 2 and table.loc[("1F1B, m=2", 1), "peak"] == 1
    assert table.loc[("1F1B, m=2", 1), "peak_sequences"] == 4  # one micro-batch of 8 / 2
    assert table["theory"].tolist() == pytest.approx([1 / 3] * 4)
    assert (table["step_ms"] > 0).all() and (table["busy_ms"] > 0).all()
    assert (table["busy_ms"] < table["step_ms"]).all()  # busy is part of the step
    fig = plot_pipeline_try(runs["1F1B, m=2"], pd.DataFrame(columns=list(TRY_COLUMNS)))
    assert "1F1B, m=2" in fig.get_axes()[0].get_title(loc="left")


def test_run_pipelines_validates_before_starting() -> None:
    with pytest.raises(ValueError, match="micro_batches"):
        run_pipelines({"bad": dict(strategy="pp-gpipe", micro_batches=3)}, **FAST)
    with pytest.raises(ValueError, match="world_size"):
        run_pipelines(
            {
                "two": dict(strategy="pp-gpipe", world_size=2),
                "three": dict(strategy="pp-gpipe", world_size=3),
            },
            **FAST,
        )


# ---------------------------------------------------------------------------------------------
# The schedule explorer: any schedule, p, m, v on paper; the real run on 2 processes
# ---------------------------------------------------------------------------------------------


def test_schedule_panel_redraws_the_simulation_and_names_a_bad_choice():
    from labkit.widgets.schedules_panel import SchedulePanel

    panel = SchedulePanel(**FAST)
    panel.update()
    first = figure_signature(panel.figure)
    assert "ZB-H1, p=4, m=8" in panel.message and panel.chunks.disabled
    panel.schedule.value = "interleaved-1f1b"  # observers redraw at once
    assert not panel.chunks.disabled and "v=2" in panel.message
    assert figure_signature(panel.figure) != first
    drawn = panel.figure
    panel.micro_batches.value = 6  # not a multiple of p = 4
    assert panel.message.startswith("Not simulated") and "multiple of pp=4" in panel.message
    assert panel.figure is drawn


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_schedule_panel_runs_the_schedule_on_two_processes():
    from labkit.widgets.schedules_panel import SchedulePanel

    panel = SchedulePanel(schedule="interleaved-1f1b", micro_batches=2, **FAST)
    panel.run()
    assert panel.result is not None, panel.message
    cfg = panel.result.config
    assert (cfg.pp, cfg.pp_schedule, cfg.pp_virtual_stages) == (2, "interleaved-1f1b", 2)
    assert "measured" in panel.message and panel.figure is not None
