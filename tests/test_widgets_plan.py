"""Notebook 09's planner panel and figures, without a browser."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from labkit import plan  # noqa: E402
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.plan import plot_breakdown, plot_validation  # noqa: E402
from labkit.widgets.plan import PlanPanel  # noqa: E402


def test_panel_answers_and_changes_with_the_question() -> None:
    panel = PlanPanel(model="llama-2-7b", gpus=64, card="H100", global_batch=256)
    assert panel.message.startswith("best of")
    assert panel.table is not None and panel.table["fits"].iloc[0]
    first = figure_signature(panel.figure)
    panel.card.value = "A100"  # a slower card: the answer and the figure change
    assert figure_signature(panel.figure) != first
    assert "A100" in panel.figure.get_suptitle()


def test_panel_says_when_nothing_fits() -> None:
    panel = PlanPanel(model="llama-3.1-70b", gpus=8, card="L4", global_batch=64)
    assert "none of" in panel.message and "fits" in panel.message


def test_breakdown_draws_one_bar_per_part_and_plan() -> None:
    cluster = plan.cluster("H100", 64)
    preds = [
        plan.predict(
            dict(model="llama-2-7b", global_batch_size=64, dp=8, tp=8, recompute=r), cluster
        )
        for r in ("none", "full")
    ]
    fig = plot_breakdown(preds)
    left, right = fig.get_axes()[:2]
    assert len(left.patches) == 4 * len(preds)
    assert len(right.patches) == 5 * len(preds)


def test_validation_plot_has_a_point_per_run() -> None:
    table = pd.DataFrame(
        {
            "model": ["micro", "micro", "small"],
            "predicted_step_ms": [10.0, 20.0, 30.0],
            "measured_step_ms": [11.0, 19.0, 40.0],
            "predicted_MiB": [1.0, 2.0, 3.0],
            "measured_MiB": [1.0, 2.0, 3.1],
        }
    )
    fig = plot_validation(table)
    from matplotlib.collections import PathCollection

    for ax in fig.get_axes()[:2]:
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert sum(len(c.get_offsets()) for c in scatters) == len(table)
