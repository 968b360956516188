"""Notebook 03's bucket panel, lesson helpers and figures, tested without a browser.

The panel is driven by setting the slider and calling ``update()``. Runs are tiny (nano GPT, a
few steps); the multi-process ones are marked ``distributed``.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import labkit  # noqa: E402
from labkit.config import TrainConfig  # noqa: E402
from labkit.lessons.data_parallel import (  # noqa: E402
    ring_walkthrough,
    run_strategies,
    scaling_experiment,
    scaling_table,
    step_breakdown,
    worst_difference,
)
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.data_parallel import (  # noqa: E402
    plot_allreduce_bandwidth,
    plot_bucket_sweep,
    plot_memory_per_rank,
    plot_ring_steps,
    plot_scaling,
    plot_step_breakdown,
    plot_timeline,
    plot_zero_theory,
)
from labkit.result import RunResult  # noqa: E402
from labkit.widgets.data_parallel import BucketPanel, bucket_try  # noqa: E402

TINY = {"model": "nano", "steps": 4, "global_batch_size": 4, "eval_every": 0}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _fake_run(timeline_rows: list[tuple], metrics_rows: list[dict]) -> RunResult:
    """A RunResult built from hand-written rows (no training)."""
    cfg = TrainConfig(model="nano", strategy="dp-bucketed", world_size=2, steps=4)
    payload = {"metrics": metrics_rows, "timeline": timeline_rows, "layer_norms": [], "state": {}}
    return RunResult.from_ranks(cfg, payload, {})


# --- the panel ---------------------------------------------------------------------------------


@pytest.mark.distributed
def test_panel_runs_and_redraws_when_the_bucket_size_changes():
    panel = BucketPanel(bucket_mb=0.01, **TINY)
    assert panel.result is None and panel.figure is None and panel.tries.empty
    panel.update()
    first, first_fig = panel.result, figure_signature(panel.figure)
    assert first is not None and first.config.bucket_mb == pytest.approx(0.01)
    # 10 KB buckets: about one bucket per parameter tensor of the nano GPT (many all-reduces).
    many = panel.tries.iloc[0]["buckets"]
    assert many > 5
    assert "all-reduces per step" in panel.message

    panel.bucket_mb.value = 10.0  # larger than all the gradients: one bucket
    panel.update()
    assert panel.result is not first
    assert panel.result.config.bucket_mb == pytest.approx(10.0)
    assert list(panel.tries["buckets"]) == [many, 1]
    assert (panel.tries["step_time_s"] > 0).all()
    assert figure_signature(panel.figure) != first_fig
    # The panel's figure is the sweep plus the last run's timeline (one compute lane per rank).
    labels = [t.get_text() for t in panel.figure.axes[1].get_yticklabels()]
    assert "rank 1 compute" in labels and "rank 0 comm (1)" in labels

    panel.clear()
    assert panel.tries.empty


def test_panel_reports_rejected_settings_instead_of_raising():
    # A global batch of 1 cannot be split over 2 ranks: TrainConfig rejects it before any start.
    panel = BucketPanel(bucket_mb=1.0, **{**TINY, "global_batch_size": 1})
    panel.update()
    assert panel.result is None and panel.figure is None
    assert "global_batch_size" in panel.message
    assert "#b00020" in panel.status.value  # shown in red
    assert not panel.button.disabled  # ready for another try


def test_bucket_try_counts_buckets_from_the_timeline():
    timeline = [
        (0, s, -1, "allreduce", 0.1 * s + 0.01 * b, 0.1 * s + 0.01 * b + 0.005)
        for s in range(4)
        for b in range(3)
    ]
    metrics = [{"step": s, "rank": r, "step_time_s": 0.1 + s} for s in range(4) for r in (0, 1)]
    row = bucket_try(_fake_run(timeline, metrics))
    assert row["buckets"] == 3
    assert row["step_time_s"] == pytest.approx(2.6)  # median of steps 2 and 3 (2.1, 3.1)


# --- step_breakdown ----------------------------------------------------------------------------


def test_step_breakdown_measures_overlap_from_the_timeline():
    # Step 2 on rank 0: compute 0-10 and 12-14 ms; two concurrent all-reduces 8-11 and 9-13 ms.
    # Communication in flight 8-13 (5 ms), of which 8-10 and 12-13 hide under compute (3 ms).
    ms = 1e-3
    timeline = [
        (0, 2, 0, "forward", 0 * ms, 4 * ms),
        (0, 2, 0, "backward", 4 * ms, 10 * ms),
        (0, 2, -1, "allreduce", 8 * ms, 11 * ms),
        (0, 2, -1, "allreduce", 9 * ms, 13 * ms),
        (0, 2, -1, "optimizer", 12 * ms, 14 * ms),
    ]
    metrics = [
        {"step": 2, "rank": 0, "step_time_s": 15 * ms, "tokens_per_s": 100.0, "comm_bytes": 2e6}
    ]
    table = step_breakdown(_fake_run(timeline, metrics))
    row = table.iloc[0]
    assert (row["strategy"], row["rank"]) == ("run", 0)
    assert row["compute_s"] == pytest.approx(12 * ms)
    assert row["comm_s"] == pytest.approx(5 * ms)  # not 3 + 4: concurrent spans count once
    assert row["hidden_comm_s"] == pytest.approx(3 * ms)
    assert row["exposed_comm_s"] == pytest.approx(2 * ms)
    assert row["other_s"] == pytest.approx(1 * ms)  # 15 - 12 - 2
    assert row["comm_mb"] == pytest.approx(2.0)


def test_step_breakdown_leaves_out_the_first_steps():
    timeline = [(0, s, 0, "forward", s, s + 0.5) for s in range(3)]
    metrics = [
        {"step": s, "rank": 0, "step_time_s": 1.0, "tokens_per_s": 1.0, "comm_bytes": 0}
        for s in range(3)
    ]
    assert len(step_breakdown(_fake_run(timeline, metrics), skip=2)) == 1
    assert step_breakdown(_fake_run(timeline, metrics), skip=5).empty


# --- the ring and the strategies, on real processes --------------------------------------------


@pytest.mark.distributed
def test_ring_walkthrough_shows_reduce_scatter_then_all_gather():
    ring = ring_walkthrough(world_size=3, sizes_bytes=(4096,), iters=1)
    assert ring.received == [1.0, 2.0, 3.0]
    assert ring.matches_all_reduce
    s = ring.states
    assert sorted(s["step"].unique()) == [0, 1, 2, 3, 4]
    # At the start rank r holds only its own contribution 2**r in every chunk.
    start = s[s["step"] == 0]
    assert (start["mask"] == 2 ** start["rank"]).all()
    # After the reduce-scatter (n - 1 = 2 steps) rank r holds the full sum of chunk r + 1 only.
    after_rs = s[(s["step"] == 2) & (s["mask"] == 7)]
    assert sorted(zip(after_rs["rank"], after_rs["chunk"])) == [(0, 1), (1, 2), (2, 0)]
    # After the all-gather every rank holds every sum.
    assert (s[s["step"] == 4]["mask"] == 7).all()
    # Each step every rank received exactly one chunk.
    assert (s[s["step"] > 0].groupby(["step", "rank"])["received"].sum() == 1).all()
    assert set(ring.benchmark["algorithm"]) == {"torch all_reduce", "ring (send/recv)"}
    assert figure_signature(plot_ring_steps(s)) != figure_signature(
        plot_ring_steps(s[s["step"] < 4])
    )
    assert plot_allreduce_bandwidth(ring.benchmark).axes[0].get_xscale() == "log"


@pytest.mark.distributed
def test_run_strategies_matches_single_and_times_communication():
    single = labkit.run(**TINY, progress=False)
    runs = run_strategies(["dp-naive", "dp-bucketed"], world_size=2, progress=False, **TINY)
    assert list(runs) == ["dp-naive", "dp-bucketed"]
    for name, run in runs.items():
        assert run.config.strategy == name and run.config.world_size == 2
        assert sorted(run.metrics["rank"].unique()) == [0, 1]
        assert len(run.metrics) == 2 * TINY["steps"]
    worst = worst_difference(single, runs)
    assert (worst <= 1e-5).all(), worst

    table = step_breakdown(runs)
    assert set(table["strategy"]) == {"dp-naive", "dp-bucketed"}
    assert (table[["compute_s", "comm_s", "hidden_comm_s", "other_s"]] >= 0).all().all()
    naive = table[table["strategy"] == "dp-naive"]
    # dp-naive all-reduces after backward, blocking: none of it overlaps computation.
    assert (naive["hidden_comm_s"] == 0).all() and (naive["comm_s"] > 0).all()
    assert figure_signature(plot_step_breakdown(table)) != figure_signature(
        plot_step_breakdown(table.iloc[:2])
    )
    fig = plot_timeline(runs["dp-bucketed"])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "rank 0 compute" and labels[2] == "rank 1 compute"
    assert labels[1].startswith("rank 0 comm (") and labels[1] != "rank 0 comm (0)"


def test_run_strategies_validates_before_starting():
    with pytest.raises(ValueError, match="global_batch_size"):
        run_strategies(["ddp"], world_size=2, model="nano", global_batch_size=1)


# --- the scaling rule --------------------------------------------------------------------------


def test_scaling_experiment_scales_batch_and_lr_and_keeps_the_sequences():
    runs = scaling_experiment(steps=8, k=4, lr=0.05, progress=False)
    table = scaling_table(runs)
    assert list(table["global_batch"]) == [4, 16, 16, 16]
    assert list(table["steps"]) == [8, 2, 2, 2]
    assert table["sequences_seen"].nunique() == 1
    assert list(table["lr"]) == pytest.approx([0.05, 0.05, 0.2, 0.2])
    assert list(table["warmup_steps"]) == [0, 0, 0, 0]  # a quarter of 2 steps rounds to 0
    warm = scaling_experiment(("warmup",), steps=16, k=2, warmup_steps=3, progress=False)
    (run,) = warm.values()
    assert run.config.warmup_steps == 3 and run.metrics["lr"].iloc[0] == 0.0
    fig = plot_scaling(runs)
    assert figure_signature(fig) != figure_signature(plot_scaling(warm))


def test_scaling_experiment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=3"):
        scaling_experiment(steps=8, k=3, progress=False)
    with pytest.raises(ValueError, match="runs"):
        scaling_experiment(("fastest",), progress=False)


# --- figures from data -------------------------------------------------------------------------


def test_memory_figures_follow_their_data():
    frame = pd.DataFrame(
        {
            "strategy": ["ddp", "ddp", "fsdp", "fsdp"],
            "rank": [0, 1, 0, 1],
            "n_params": [1000] * 4,
            "params_bytes": [4000, 4000, 2000, 2000],
            "grads_bytes": [4000, 4000, 2000, 2000],
            "optimizer_bytes": [8000, 8000, 4000, 4000],
            "paper_total_bytes": [16000.0, 16000.0, 8000.0, 8000.0],
        }
    )
    fig = plot_memory_per_rank(frame, strategies=["fsdp", "ddp"])
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0].startswith("fsdp") and ticks[-1].startswith("ddp")
    smaller = frame.assign(optimizer_bytes=frame["optimizer_bytes"] // 2)
    assert figure_signature(fig) != figure_signature(plot_memory_per_rank(smaller))

    theory = plot_zero_theory(7_000_000_000, world_sizes=(1, 8))
    dp_line = theory.axes[0].get_lines()[0]
    assert list(dp_line.get_ydata()) == pytest.approx([112.0, 112.0])  # 16 bytes x 7e9, unsharded
    zero3 = theory.axes[0].get_lines()[3]
    assert zero3.get_ydata()[-1] == pytest.approx(14.0)  # 112 GB / 8 ranks


def test_bucket_sweep_figure_marks_the_last_try():
    tries = pd.DataFrame({"bucket_mb": [0.1, 1.0], "step_time_s": [0.05, 0.03], "buckets": [9, 2]})
    fig = plot_bucket_sweep(tries)
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0.1, 1.0]
    assert list(line.get_ydata()) == pytest.approx([50.0, 30.0])
    circled = fig.axes[0].get_lines()[1]  # the last try (1.0 MB), not the smallest
    assert list(circled.get_xdata()) == [1.0]
