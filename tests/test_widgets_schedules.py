"""Notebook 02's schedule designer, figures and lesson helpers, tested without a browser."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labkit.lessons.schedules import (  # noqa: E402
    lr_per_step,
    run_schedules,
    run_status,
    schedule_table,
    unigram_loss,
    warmup_experiment,
    warmup_spread,
)
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.schedules import (  # noqa: E402
    plot_lr_curves,
    plot_schedule_runs,
    plot_untuned_warmup,
    plot_warmup_grid,
    smooth,
)
from labkit.schedules import get_schedule  # noqa: E402
from labkit.widgets.schedules import ScheduleDesigner, describe_schedule  # noqa: E402

# Tiny runs: enough steps for a warm-up, an evaluation and a schedule to show, in well under 1 s.
TINY = {"model": "nano", "block_size": 16, "global_batch_size": 4, "steps": 6, "eval_every": 3}


@pytest.fixture
def panel() -> ScheduleDesigner:
    p = ScheduleDesigner("cosine", total_steps=100, warmup_steps=10, peak_lr=1e-3)
    p.update()
    return p


def test_panel_draws_the_schedule_the_training_loop_uses(panel: ScheduleDesigner) -> None:
    expected = get_schedule("cosine", peak_lr=1e-3, total_steps=100, warmup_steps=10)
    assert panel.schedule == expected
    assert panel.curve == expected.curve()
    drawn = panel.figure.axes[0].get_lines()[-1].get_ydata()
    assert list(drawn) == pytest.approx(expected.curve())
    assert "cosine" in panel.message and "warm-up 10" in panel.message


def test_moving_a_slider_changes_the_curve_and_the_figure(panel: ScheduleDesigner) -> None:
    before_fig, before_curve = figure_signature(panel.figure), list(panel.curve)
    panel.warmup_steps.value = 40
    panel.update()
    assert panel.curve != before_curve
    assert panel.curve[40] == pytest.approx(1e-3)  # the peak comes exactly at warmup_steps
    assert panel.curve[20] == pytest.approx(0.5e-3)
    assert figure_signature(panel.figure) != before_fig

    panel.name.value = "wsd"
    panel.update()
    assert panel.schedule.name == "wsd"
    assert panel.curve[60] == pytest.approx(1e-3)  # WSD holds the peak in its stable phase


@pytest.mark.parametrize(
    ("control", "value", "field"),
    [
        ("warmup_steps", 500, "warmup_steps"),  # warm-up longer than the 100-step run
        ("min_lr", 5e-3, "min_lr"),  # floor above the 1e-3 peak
    ],
)
def test_invalid_settings_show_a_message_instead_of_raising(
    panel: ScheduleDesigner, control: str, value: float, field: str
) -> None:
    getattr(panel, control).value = value  # the observer calls update(): it must not raise
    panel.update()
    assert panel.schedule is None and panel.curve == []
    assert panel.message.startswith("Not a valid schedule")
    assert field in panel.message
    assert field in panel.status.value  # shown in the panel, in the error colour
    assert "#b00020" in panel.status.value
    assert panel.figure is not None  # an (empty) figure, titled with the reason
    assert "No valid schedule" in panel.figure.axes[0].get_title()

    getattr(panel, control).value = 0  # fixing the setting brings the curve back
    panel.update()
    assert panel.schedule is not None and "Not a valid" not in panel.message


def test_constant_schedule_with_a_floor_is_explained(panel: ScheduleDesigner) -> None:
    panel.name.value = "constant"
    panel.min_lr.value = 1e-4
    panel.update()
    assert panel.schedule is None
    assert "constant" in panel.message and "min_lr" in panel.message


def test_comparison_overlays_kept_curves(panel: ScheduleDesigner) -> None:
    assert len(panel.figure.axes[0].get_lines()) == 1
    panel.add_button.click()
    panel.name.value = "linear"
    panel.update()
    lines = panel.figure.axes[0].get_lines()
    assert len(lines) == 2
    assert list(panel.comparison) == [
        describe_schedule(panel.comparison[next(iter(panel.comparison))])
    ]
    kept, current = (list(line.get_ydata()) for line in lines)
    assert kept != current  # cosine and linear decays differ after the warm-up
    panel.clear_button.click()
    assert len(panel.figure.axes[0].get_lines()) == 1 and not panel.comparison


def test_untuned_warmup_takes_its_length_from_beta2(panel: ScheduleDesigner) -> None:
    panel.warmup.value = "untuned_linear"  # moves the warm-up slider to 0 by itself
    assert panel.warmup_steps.value == 0
    panel.beta2.value = 0.95
    panel.update()
    assert panel.schedule is not None
    assert panel.schedule.warmup_length == pytest.approx(40.0)  # 2 / (1 - 0.95)
    assert "40 steps" in panel.message

    panel.warmup_steps.value = 10  # a tuned length is rejected for an untuned warm-up
    panel.update()
    assert panel.schedule is None and "warmup_steps" in panel.message


def test_panel_does_not_leak_figures(panel: ScheduleDesigner) -> None:
    open_before = len(plt.get_fignums())
    for steps in range(1, 30):
        panel.warmup_steps.value = steps
    assert len(plt.get_fignums()) <= open_before


# ------------------------------------------------------------------ figures


def test_plot_lr_curves_draws_each_schedule() -> None:
    a = get_schedule("cosine", peak_lr=1.0, total_steps=50, warmup_steps=5)
    b = get_schedule("wsd", peak_lr=1.0, total_steps=50, warmup_steps=5)
    fig = plot_lr_curves({"a": a, "b": b.curve()}, highlight="a")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    assert list(lines[1].get_ydata()) == b.curve()
    assert lines[0].get_linewidth() > lines[1].get_linewidth()
    plt.close(fig)


def test_plot_untuned_warmup_lengths() -> None:
    fig = plot_untuned_warmup((0.9, 0.99), total_steps=300)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any("(20 steps)" in label for label in labels)  # 2 / (1 - 0.9)
    assert any("(200 steps)" in label for label in labels)  # 2 / (1 - 0.99)
    plt.close(fig)


def test_warmup_grid_marks_the_plateau_and_a_spike() -> None:
    def fake(losses: list[float]) -> SimpleNamespace:
        steps = range(len(losses))
        frame = pd.DataFrame({"step": steps, "rank": 0, "loss": losses, "lr": 1e-3})
        return SimpleNamespace(metrics=frame)

    calm, spiky = [4.0, 3.5, 3.0, 2.8, 2.7, 2.6], [4.0, 3.5, 9.0, 3.3, 3.3, 3.3]
    runs = {("post", "warm-up"): fake(calm), ("post", "none"): fake(spiky)}
    fig = plot_warmup_grid(runs, plateau=3.25, window=1)
    ax = fig.axes[0]
    assert ax.get_ylim()[1] == pytest.approx(4.5)  # a little above the initial loss, not at 9
    assert [t.get_text() for t in ax.texts] == ["spike: 9"]
    assert any(line.get_label() == "unigram loss" for line in ax.get_lines())
    plt.close(fig)


def test_smooth_is_a_trailing_mean() -> None:
    assert list(smooth([1.0, 3.0, 5.0, 7.0], window=2)) == [1.0, 2.0, 4.0, 6.0]


# ------------------------------------------------------------------ lesson helpers (real runs)


def test_warmup_experiment_grid_table_and_figure() -> None:
    runs: dict = {}
    table = warmup_experiment(
        (0,),
        warmups={"none": {}, "warm-up 3": {"warmup_steps": 3}},
        runs=runs,
        progress=False,
        **TINY,
    )
    assert list(runs) == [
        ("pre", "none", 0),
        ("pre", "warm-up 3", 0),
        ("post", "none", 0),
        ("post", "warm-up 3", 0),
    ]
    assert runs[("post", "none", 0)].config.norm == "post"
    assert runs[("pre", "warm-up 3", 0)].metrics["lr"].iloc[0] == 0.0  # warm-up starts at LR 0
    assert runs[("pre", "none", 0)].metrics["lr"].iloc[0] == pytest.approx(3.5e-2)
    assert len(table) == 4 and set(table["status"]) <= {"trains", "stalled", "diverged"}
    spread = warmup_spread(table)
    assert spread.index.names == ["norm", "warm-up"] and len(spread) == 4
    fig = plot_warmup_grid(runs)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes[:2]] == ["pre-LN GPT", "post-LN GPT"]
    plt.close(fig)


def test_run_status_calls_an_untrained_model_stalled() -> None:
    plateau = unigram_loss()
    assert 2.5 < plateau < 4.0  # English characters: a few nats
    (run,) = run_schedules(
        {"tiny lr": {"lr": 1e-6, "warmup_steps": 0}}, progress=False, **TINY
    ).values()
    assert run.final_val_loss > plateau
    assert run_status(run) == "stalled"


def test_schedule_runs_differ_only_in_schedule() -> None:
    runs = run_schedules(
        {"cosine": {"schedule": "cosine"}, "wsd": {"schedule": "wsd"}},
        progress=False,
        **dict(TINY, steps=10, warmup_steps=2, eval_every=5),
    )
    cos, wsd = (r.metrics["lr"].tolist() for r in runs.values())
    assert cos[:3] == wsd[:3]  # the same warm-up ...
    assert cos[6] < wsd[6] == pytest.approx(1e-2)  # ... then WSD holds the peak, cosine decays
    table = schedule_table(runs)
    assert list(table.index) == ["cosine", "wsd"]
    assert all(math.isfinite(v) for v in table["validation loss"])
    fig = plot_schedule_runs(runs)
    assert len(fig.axes) == 2 and len(fig.axes[1].get_lines()) == 2
    plt.close(fig)


def test_lr_changes_once_per_optimizer_step_with_accumulation() -> None:
    (run,) = run_schedules(
        {"acc": {"schedule": "linear", "warmup_steps": 0}},
        progress=False,
        **dict(TINY, grad_accum_steps=2),
    ).values()
    table = lr_per_step(run)
    assert len(table) == TINY["steps"]  # one row per optimizer step, not per micro-batch
    assert list(table["micro-batches done"]) == [2, 4, 6, 8, 10, 12]
    assert table["lr"].tolist() == pytest.approx(table["schedule_lr"].tolist(), rel=1e-12)
    assert table["lr"].nunique() == len(table)  # a linear decay: a new LR every step
