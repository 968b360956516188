"""Notebook 00's helpers without a browser: machine table, live plot, example panel, run plots."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import labkit  # noqa: E402
from labkit.data import load_corpus  # noqa: E402
from labkit.lessons.tour import describe_machine, machine_facts, uniform_loss  # noqa: E402
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.training import plot_loss, plot_run  # noqa: E402
from labkit.widgets.live import LiveLossPlot, train_live  # noqa: E402
from labkit.widgets.tour import TourPanel  # noqa: E402

QUICK = {"model": "nano", "steps": 12, "threads": 1, "progress": False}


def test_describe_machine_matches_what_torch_sees() -> None:
    table = describe_machine()
    assert {"device", "backend", "gpus", "cpu_cores", "torch"} <= set(table.index)
    facts = machine_facts()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert facts["gpus"] == n_gpus
    expected = ("cuda", "nccl") if n_gpus else ("cpu", "gloo")
    assert (facts["device"], facts["backend"]) == expected
    assert table.loc["device", "value"] == expected[0]
    assert table["meaning"].str.len().min() > 0  # every row explains itself


def test_uniform_loss_is_log_of_the_vocabulary() -> None:
    assert uniform_loss("synthetic") == pytest.approx(math.log(load_corpus("synthetic").vocab_size))


def test_train_live_redraws_and_trains_exactly_like_run() -> None:
    live = train_live(every=5, show=False, **QUICK)
    assert live.info["live_updates"] == 3  # after steps 5, 10 and the last one, 12
    assert live.info["wall_s"] > 0
    plain = labkit.run(**QUICK)
    # The same loop on the same batches: bit-for-bit the same weights and losses.
    assert live.compare(plain)["relative_difference"].max() == 0.0
    assert list(live.losses) == list(plain.losses)
    assert not math.isnan(live.final_val_loss)


def test_train_live_rejects_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="strategy"):
        train_live(strategy="ddp", world_size=2, show=False, **QUICK)
    with pytest.raises(ValueError, match="every"):
        train_live(every=0, show=False, **QUICK)
    with pytest.raises(ValueError, match="steps"):
        train_live(show=False, **{**QUICK, "steps": 0})


def test_live_plot_changes_with_the_rows() -> None:
    plot = LiveLossPlot(total_steps=4, title="t", show=False)
    empty = figure_signature(plot.figure)
    rows = [{"step": s, "loss": 4.0 - s, "val_loss": math.nan, "lr": 0.1} for s in range(2)]
    plot.update(rows)
    assert figure_signature(plot.figure) != empty
    assert "step 2 of 4" in plot.figure.get_suptitle()
    plot.close()


def test_tour_panel_trains_compares_and_reports_bad_settings() -> None:
    panel = TourPanel(lr=1e-2, steps=10, keep=2)
    panel.update()
    assert panel.result is not None and panel.result.config.steps == 10
    first = figure_signature(panel.figure)
    panel.lr.value = 0.1
    panel.update()
    assert panel.result.config.lr == pytest.approx(0.1)
    assert figure_signature(panel.figure) != first
    panel.schedule.value = "constant"
    panel.update()
    assert len(panel.runs) == 2  # keep=2: the oldest run left the figure
    assert all("constant" in label or "lr=0.1" in label for label in panel.runs)
    assert "validation loss" in panel.message

    bad = TourPanel(steps=10, model="not-a-model")
    bad.update()  # must not raise
    assert bad.result is None and bad.figure is None
    assert "TrainConfig.model" in bad.message


def _two_rank_metrics() -> pd.DataFrame:
    rows = []
    for step in range(5):
        for rank in (0, 1):
            rows.append(
                {
                    "step": step,
                    "rank": rank,
                    "loss": 4.0 - 0.1 * step,
                    "val_loss": 3.5 if step == 4 else math.nan,
                    "lr": 0.01,
                    "grad_norm": 2.0,
                    "grad_norm_clipped": 1.0,
                    "tokens_per_s": 1000.0 * (rank + 1),
                }
            )
    return pd.DataFrame(rows)


def test_plot_run_draws_one_throughput_line_per_rank() -> None:
    fig = plot_run(_two_rank_metrics(), title="x")
    loss_ax, lr_ax, norm_ax, throughput_ax = fig.get_axes()
    assert len(throughput_ax.get_lines()) == 2
    assert len(norm_ax.get_lines()) == 2  # before and after clipping, rank 0 only
    assert list(lr_ax.get_lines()[0].get_ydata()) == [0.01] * 5
    assert len(loss_ax.get_lines()) == 2  # training line and validation dots


def test_plot_loss_draws_the_target() -> None:
    with_target = plot_loss({"a": _two_rank_metrics()}, target=3.0)
    without = plot_loss({"a": _two_rank_metrics()})
    assert len(with_target.get_axes()[0].get_lines()) == len(without.get_axes()[0].get_lines()) + 1
