"""Figures for notebook 03, data parallelism. Every function takes data and returns a Figure.

* ``plot_ring_steps``: what every rank holds after each step of a ring all-reduce.
* ``plot_allreduce_bandwidth``: bus bandwidth of torch's all-reduce and of the ring, per size.
* ``plot_timeline`` (and ``draw_timeline``): a Gantt chart of one training step on every rank:
  forward, backward, optimizer, and each bucket's all-reduce in flight.
* ``plot_step_breakdown``: where each rank's step time goes, and tokens per second per rank.
* ``plot_bucket_sweep``: step time against bucket size, next to the last try's timeline.
* ``plot_memory_per_rank`` and ``plot_zero_theory``: ZeRO memory, measured against the formulas.
* ``plot_scaling``: loss and LR against sequences seen, for the linear scaling rule runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from labkit.lessons.memory import zero_memory_formula
from labkit.plots.common import new_figure
from labkit.plots.training import rank0
from labkit.timeline import COMM_PHASES

__all__ = [
    "PHASE_COLORS",
    "draw_timeline",
    "plot_allreduce_bandwidth",
    "plot_bucket_sweep",
    "plot_memory_per_rank",
    "plot_ring_steps",
    "plot_scaling",
    "plot_step_breakdown",
    "plot_timeline",
    "plot_zero_theory",
]

PHASE_COLORS = {
    "forward": "C0",
    "backward": "C1",
    "optimizer": "C2",
    "allreduce": "C3",
    "broadcast": "C4",
    "allgather": "C6",
    "reduce_scatter": "C9",
    "send": "C5",
    "recv": "C8",
    "wait": "C7",
    "norm_allreduce": "0.5",
}
MB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


def plot_ring_steps(states: pd.DataFrame, title: str | None = None) -> Figure:
    """One small grid per step of a ring all-reduce: rows are ranks, columns are chunks.

    ``states`` is ``RingWalkthrough.states``. A cell shows which ranks' contributions the chunk
    holds ("0+2"); its colour, how many; a black frame marks the chunk that just arrived.
    """
    steps = sorted(states["step"].unique())
    n = int(states["rank"].max()) + 1
    fig, axes = new_figure(ncols=len(steps), width=2.1, height=2.5)
    axes = np.atleast_1d(axes)
    for ax, step in zip(axes, steps, strict=True):
        rows = states[states["step"] == step]
        grid = np.zeros((n, n))
        for row in rows.itertuples():
            grid[row.rank, row.chunk] = bin(row.mask).count("1")
            names = [str(r) for r in range(n) if row.mask >> r & 1]
            ax.text(row.chunk, row.rank, "+".join(names), ha="center", va="center", fontsize=8)
            if row.received:
                ax.add_patch(
                    _frame(row.chunk, row.rank),
                )
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=n + 0.5)
        phase = rows["phase"].iloc[0]
        ax.set_title(phase if step == 0 else f"{phase}\nstep {step}", fontsize=9)
        ax.set_xticks(range(n), [f"c{c}" for c in range(n)], fontsize=8)
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)], fontsize=8)
        ax.tick_params(length=0)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title or f"Ring all-reduce on {n} ranks: which ranks' numbers each chunk holds")
    return fig


def _frame(x: float, y: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, fill=False, edgecolor="black", linewidth=2)


def plot_allreduce_bandwidth(benchmark: pd.DataFrame, title: str | None = None) -> Figure:
    """Bus bandwidth (GB/s) against message size, one line per algorithm."""
    fig, ax = new_figure(width=6.5)
    for i, (name, rows) in enumerate(benchmark.groupby("algorithm", sort=False)):
        ax.plot(rows["size_bytes"], rows["busbw_GBps"], "o-", color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("tensor size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    world = int(benchmark["world_size"].iloc[0]) if len(benchmark) else 0
    backend = benchmark["backend"].iloc[0] if len(benchmark) else ""
    ax.set_title(title or f"All-reduce on {world} {backend} processes")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Timelines and step time
# ---------------------------------------------------------------------------------------------


def _steady_step(timeline: pd.DataFrame) -> int:
    """A representative step: the middle one (the first steps pay one-off set-up costs)."""
    steps = sorted(timeline["step"].unique())
    return int(steps[len(steps) // 2])


def draw_timeline(ax: Axes, timeline: pd.DataFrame, step: int | None = None) -> int:
    """Gantt chart of one step on every rank; returns the step drawn.

    Each rank gets a compute lane (forward, backward, optimizer) and, below it, a communication
    lane split into thin sub-lanes, one per concurrent all-reduce (bucket), so that buckets in
    flight at the same time, and their overlap with backward, are visible.
    """
    if timeline.empty:
        ax.text(0.5, 0.5, "no timeline recorded", ha="center", va="center", transform=ax.transAxes)
        return -1
    step = _steady_step(timeline) if step is None else step
    events = timeline[timeline["step"] == step]
    origin = events["start_s"].min()
    # A collective that finds its peers already waiting takes microseconds: give every bar a
    # visible minimum width (0.6% of the step) so no all-reduce disappears from the chart.
    min_ms = 0.006 * (events["end_s"].max() - origin) * 1e3
    ranks = sorted(events["rank"].unique())
    yticks, ylabels = [], []
    for lane, rank in enumerate(ranks):
        mine = events[events["rank"] == rank].sort_values("start_s")
        top = lane * 2.6
        compute = mine[~mine["phase"].isin(COMM_PHASES)]
        for row in compute.itertuples():
            color = PHASE_COLORS.get(row.phase, "C7")
            ax.barh(
                top,
                (row.end_s - row.start_s) * 1e3,
                left=(row.start_s - origin) * 1e3,
                height=0.9,
                color=color,
            )
        comm = mine[mine["phase"].isin(COMM_PHASES)]
        n = max(1, len(comm))
        for i, row in enumerate(comm.itertuples()):
            y = top + 0.9 + (i + 0.5) / n * 1.1
            ax.barh(
                y,
                max((row.end_s - row.start_s) * 1e3, min_ms),
                left=(row.start_s - origin) * 1e3,
                height=1.1 / n * 0.8,
                color=PHASE_COLORS.get(row.phase, "C3"),
            )
        yticks += [top, top + 1.45]
        ylabels += [f"rank {rank} compute", f"rank {rank} comm ({len(comm)})"]
    ax.set_yticks(yticks, ylabels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time since the step's first event (ms)")
    phases = [p for p in PHASE_COLORS if p in set(events["phase"])]
    ax.legend(
        handles=[Patch(color=PHASE_COLORS[p], label=p) for p in phases],
        fontsize=8,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncols=len(phases),
        frameon=False,
    )
    return step


def plot_timeline(result: Any, step: int | None = None, title: str | None = None) -> Figure:
    """Gantt chart of one step of ``result`` (a RunResult) on every rank."""
    fig, ax = new_figure(width=8.0, height=1.5 + 1.1 * result.config.world_size)
    drawn = draw_timeline(ax, result.timeline, step)
    cfg = result.config
    fig.suptitle(title or f"{cfg.label}, {cfg.model} GPT: step {drawn} on every rank")
    return fig


def plot_step_breakdown(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Left: each rank's median step split into compute, exposed communication and the rest,
    with communication hidden under compute hatched. Right: tokens per second on each rank.

    ``table`` is ``labkit.lessons.data_parallel.step_breakdown``'s result.
    """
    fig, (ax_time, ax_tps) = new_figure(ncols=2, width=5.5, height=0.35 * len(table) + 2.0)
    labels = [f"{s} r{r}" for s, r in zip(table["strategy"], table["rank"], strict=True)]
    y = np.arange(len(table))
    ms = {c: table[c].to_numpy() * 1e3 for c in ("compute_s", "exposed_comm_s", "other_s")}
    ax_time.barh(y, ms["compute_s"], color="C0", label="compute")
    ax_time.barh(
        y, ms["exposed_comm_s"], left=ms["compute_s"], color="C3", label="communication (exposed)"
    )
    ax_time.barh(
        y, ms["other_s"], left=ms["compute_s"] + ms["exposed_comm_s"], color="C7", label="other"
    )
    # Communication that ran while computing costs no time: drawn hatched inside compute.
    hidden = table["hidden_comm_s"].to_numpy() * 1e3
    ax_time.barh(
        y,
        hidden,
        left=ms["compute_s"] - hidden,
        color="C0",
        edgecolor="C3",
        linewidth=0,
        hatch="////",
        label="communication hidden under compute",
    )
    ax_time.set_yticks(y, labels, fontsize=8)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("median time per step (ms)")
    ax_time.set_title("Where a step's time goes")
    fig.legend(
        *ax_time.get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8
    )

    colors = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(table["strategy"]))}
    ax_tps.barh(y, table["tokens_per_s"], color=[colors[s] for s in table["strategy"]])
    for yi, mb in zip(y, table["comm_mb"], strict=True):
        if mb:
            ax_tps.text(0, yi, f" {mb:.1f} MB sent", va="center", fontsize=7, color="white")
    ax_tps.set_yticks(y, labels, fontsize=8)
    ax_tps.invert_yaxis()
    ax_tps.set_xlabel("tokens / s on this rank (median)")
    ax_tps.set_title("Per-device throughput")
    if title:
        fig.suptitle(title)
    return fig


def plot_bucket_sweep(
    tries: pd.DataFrame,
    last: Any | None = None,
    title: str | None = None,
    xlim: tuple[float, float] = (0.007, 45.0),
) -> Figure:
    """Left: median step time of every try against its bucket size (log scale), with the number
    of buckets written next to each point. Right: the last try's timeline of one step.

    ``tries`` has columns ``bucket_mb``, ``step_time_s`` and ``buckets``; ``xlim`` is the
    bucket-size range shown (the panel's slider range), widened to fit every try.
    """
    fig, (ax_sweep, ax_tl) = new_figure(ncols=2, width=5.5, height=3.4)
    if len(tries):
        ordered = tries.sort_values("bucket_mb")
        ax_sweep.plot(ordered["bucket_mb"], ordered["step_time_s"] * 1e3, "o-", color="C3")
        for row in ordered.itertuples():
            ax_sweep.annotate(
                f"{row.buckets}",
                (row.bucket_mb, row.step_time_s * 1e3),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        latest = tries.iloc[-1]
        ax_sweep.plot(
            [latest["bucket_mb"]],
            [latest["step_time_s"] * 1e3],
            "o",
            ms=11,
            mfc="none",
            mec="black",
            label="last try",
        )
        ax_sweep.legend(fontsize=8)
    ax_sweep.set_xscale("log")
    low, high = xlim
    if len(tries):  # keep every try in view, even outside the usual range
        low, high = (
            min(low, tries["bucket_mb"].min() / 1.5),
            max(high, tries["bucket_mb"].max() * 1.5),
        )
    ax_sweep.set_xlim(low, high)
    ax_sweep.set_xlabel("bucket size (MB)")
    ax_sweep.set_ylabel("median step time (ms)")
    ax_sweep.set_title("Step time against bucket size (numbers: buckets)")
    if last is not None:
        drawn = draw_timeline(ax_tl, last.timeline)
        ax_tl.set_title(f"Last try ({last.config.bucket_mb:.3g} MB buckets): step {drawn}", pad=22)
    else:
        ax_tl.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def plot_memory_per_rank(
    frame: pd.DataFrame, strategies: Sequence[str] | None = None, title: str | None = None
) -> Figure:
    """Measured bytes per rank (parameters, gradients, optimizer state, stacked) for each
    strategy and rank, with the ZeRO paper's total as a black tick.

    ``frame`` is ``labkit.lessons.data_parallel.memory_per_rank``'s result; ``strategies`` sets the order.
    """
    order = list(dict.fromkeys(strategies or frame["strategy"]))
    frame = frame.assign(_order=frame["strategy"].map(order.index))
    frame = frame.sort_values(["_order", "rank"], kind="stable")
    fig, ax = new_figure(width=7.5, height=3.4)
    labels = [f"{s}\nrank {r}" for s, r in zip(frame["strategy"], frame["rank"], strict=True)]
    x = np.arange(len(frame))
    bottom = np.zeros(len(frame))
    parts = [
        ("params_bytes", "parameters", "C0"),
        ("grads_bytes", "gradients", "C1"),
        ("optimizer_bytes", "optimizer state", "C2"),
    ]
    for column, label, color in parts:
        values = frame[column].to_numpy() / MB
        ax.bar(x, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom += values
    paper = frame["paper_total_bytes"].to_numpy() / MB
    ax.hlines(paper, x - 0.4, x + 0.4, colors="black", linewidth=2, label="ZeRO formula (total)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("MiB per rank")
    n = int(frame["n_params"].iloc[0]) if len(frame) else 0
    ax.set_title(title or f"Memory per rank, measured ({n:,} parameters, fp32, Adam)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_zero_theory(
    n_params: int,
    world_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    *,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
    device_gb: float | None = 80.0,
    title: str | None = None,
) -> Figure:
    """Bytes per rank at each ZeRO stage against the number of ranks (the paper's formulas).

    The defaults are the paper's mixed-precision Adam: fp16 weights and gradients, and 12 bytes
    of fp32 master weights and moments per parameter. ``device_gb`` draws a device's memory as a
    dashed line (activations and buffers need room too, so a stage must stay well below it).
    """
    fig, ax = new_figure(width=6.5)
    rows = pd.concat(
        [
            zero_memory_formula(
                n_params,
                n,
                param_bytes=param_bytes,
                grad_bytes=grad_bytes,
                optimizer_bytes=optimizer_bytes,
            )
            for n in world_sizes
        ]
    )
    for i, (stage, part) in enumerate(rows.groupby("stage", sort=False)):
        ax.plot(part["world_size"], part["total_bytes"] / 1e9, "o-", color=f"C{i}", label=stage)
    if device_gb:
        ax.axhline(
            device_gb,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"one {device_gb:g} GB device",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(world_sizes), [str(n) for n in world_sizes])
    ax.set_xlabel("data-parallel ranks")
    ax.set_ylabel("GB per rank (model states)")
    per = param_bytes + grad_bytes + optimizer_bytes
    ax.set_title(title or f"{n_params / 1e9:g}B parameters, {per} bytes each before sharding")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# The linear scaling rule
# ---------------------------------------------------------------------------------------------


def plot_scaling(runs: Mapping[str, Any], window: int = 10, title: str | None = None) -> Figure:
    """Training loss (smoothed over ``window`` steps) and LR against sequences seen, per run.

    Plotting against sequences (steps x global batch) puts a small-batch run and a k-times
    larger batch on the same axis: the linear scaling rule promises the same curve.
    """
    fig, (ax_loss, ax_lr) = new_figure(ncols=2, width=5.5, height=3.4)
    # The y range fits the runs that trained; one that blew up leaves through the top, marked x.
    firsts = [float(rank0(r)["loss"].iloc[0]) for r in runs.values()]
    top = max(firsts, default=5.0) + 0.5
    lowest = top - 1.0
    for i, (label, run) in enumerate(runs.items()):
        m = rank0(run)
        seen = (m["step"] + 1) * run.config.global_batch_size
        loss = m["loss"].rolling(window, min_periods=1).mean()
        color = f"C{i % 10}"
        escaped = ~np.isfinite(loss.to_numpy()) | (loss.to_numpy() > top)
        if escaped.any():
            first = int(np.argmax(escaped))
            label = f"{label}: diverged"
            ax_loss.plot(seen.iloc[first], top, "x", color=color, ms=10, mew=2, clip_on=False)
        else:
            lowest = min(lowest, float(loss.min()))
        ax_loss.plot(seen, loss, color=color, label=label)
        ax_lr.plot(seen, m["lr"], color=color, label=label)
    ax_loss.set_ylim(lowest - 0.2, top)
    ax_loss.set_xlabel("sequences seen")
    ax_loss.set_ylabel(f"training loss ({window}-step mean)")
    ax_loss.set_title("Loss")
    ax_loss.legend(fontsize=7)
    ax_lr.set_xlabel("sequences seen")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Learning rate")
    if title:
        fig.suptitle(title)
    return fig
