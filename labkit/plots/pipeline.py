"""Figures for notebook 04, pipeline parallelism. Every function takes data and returns a Figure.

* ``draw_gantt`` / ``plot_gantt``: a Gantt chart of one step, one lane per rank (stage): each
  micro-batch's forward and backward, the time spent waiting in ``recv`` for a neighbour, the
  sends and the optimizer step. It draws a measured ``RunResult.timeline`` or a simulated one
  (``labkit.lessons.pipeline.simulate_schedule``) alike.
* ``plot_gantts``: several such charts stacked on one time axis, to compare schedules.
* ``plot_bubble_sweep``: measured bubble against the theory ``(p - 1) / (m + p - 1)`` as the
  number of micro-batches ``m`` grows, and the activations a stage holds, GPipe against 1F1B.
* ``plot_pipeline_try``: the pipeline panel's figure: the last try's Gantt chart next to every
  try's bubble on the theory curve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from labkit.lessons.pipeline_timeline import bubble_fraction
from labkit.plots.common import new_figure

__all__ = [
    "PHASE_STYLE",
    "SCHEDULE_NAMES",
    "TRY_COLORS",
    "bubble_title",
    "draw_bubble_curve",
    "draw_gantt",
    "plot_bubble_sweep",
    "plot_gantt",
    "plot_gantts",
    "plot_pipeline_try",
]

# How each phase is drawn: colour, legend text, and whether it gets a full-height bar.
PHASE_STYLE: dict[str, tuple[str, str, bool]] = {
    "forward": ("C0", "forward", True),
    "backward": ("C1", "backward", True),
    "weight": ("C4", "weight gradient (W)", True),
    "recv": ("0.85", "recv (waiting for a neighbour)", True),
    "send": ("C3", "send / wait for sends", False),
    "wait": ("C3", "send / wait for sends", False),
    "optimizer": ("C2", "clip + optimizer step", True),
    "norm_allreduce": ("0.6", "waiting for the clip norm's all-reduce", True),
}
SCHEDULE_NAMES = {
    "naive": "naive",
    "pp-gpipe": "GPipe",
    "pp-1f1b": "1F1B",
    "pp-torch": "torch 1F1B",
}
# The panel's tries keep one colour per schedule (not forward/backward blue and orange).
TRY_COLORS = {"naive": "C7", "pp-gpipe": "C4", "pp-1f1b": "C5", "pp-torch": "C8"}


def _timeline(run: Any) -> pd.DataFrame:
    """The timeline of a RunResult, or the DataFrame itself."""
    return run.timeline if hasattr(run, "timeline") else pd.DataFrame(run)


def _theory(p: int, m: np.ndarray | int) -> np.ndarray | float:
    return (p - 1) / (np.asarray(m, dtype=float) + p - 1)


def bubble_title(run: Any, label: str | None = None) -> str:
    """ "GPipe, m=4: bubble 0.23 measured, 0.20 theory" for a run (or a simulated timeline)."""
    tl = _timeline(run)
    bubble = bubble_fraction(tl)
    measured, theory = bubble["bubble"].mean(), bubble["theory"].iloc[0]
    if label is None and hasattr(run, "config"):
        cfg = run.config
        label = f"{SCHEDULE_NAMES.get(cfg.strategy, cfg.strategy)}, m={cfg.micro_batches}"
    kind = "measured" if hasattr(run, "config") else "simulated"
    prefix = f"{label}: " if label else ""
    return f"{prefix}bubble {measured:.2f} {kind}, (p-1)/(m+p-1) = {theory:.2f}"


def draw_gantt(
    ax: Axes,
    timeline: pd.DataFrame,
    step: int | None = None,
    scale: float = 1e3,
    unit: str = "ms",
    labels: bool = True,
    legend: bool = True,
) -> int:
    """Gantt chart of one step (default: the last) on every rank; returns the step drawn.

    Times are shown from the step's first event, multiplied by ``scale`` (1e3: milliseconds).
    Forward and backward bars carry their micro-batch number when they are wide enough. The
    optimizer bar includes clipping, whose global gradient norm is an all-reduce over the stages:
    a stage that finishes its backward early waits there for the others, drawn in grey over the
    optimizer bar (``norm_allreduce``), as waiting rather than work.
    """
    if timeline.empty:
        ax.text(0.5, 0.5, "no timeline recorded", ha="center", va="center", transform=ax.transAxes)
        return -1
    step = int(timeline["step"].max()) if step is None else step
    events = timeline[timeline["step"] == step]
    origin = events["start_s"].min()
    width_all = (events["end_s"].max() - origin) * scale
    ranks = sorted(events["rank"].unique())
    seen: dict[str, str] = {}
    for rank in ranks:
        for row in events[events["rank"] == rank].itertuples():
            color, name, full = PHASE_STYLE.get(row.phase, ("C7", row.phase, True))
            left = (row.start_s - origin) * scale
            # A send only posts a message: draw it as a thin mark, at least visible.
            width = max((row.end_s - row.start_s) * scale, 0.003 * width_all)
            ax.barh(
                rank,
                width,
                left=left,
                height=0.8 if full else 0.25,
                color=color,
                edgecolor="white" if full else color,
                linewidth=0.5,
            )
            seen.setdefault(name, color)
            if labels and row.phase in ("forward", "backward") and width > 0.018 * width_all:
                ax.text(
                    left + width / 2,
                    rank,
                    str(row.micro_batch),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks(ranks, [f"rank {r}\n(stage {r})" for r in ranks], fontsize=8)
    ax.set_ylim(len(ranks) - 0.4, -0.6)  # rank 0 on top
    ax.set_xlim(0, width_all * 1.01)
    ax.set_xlabel(f"time since the step's first event ({unit})")
    if legend:
        # Outside, to the right: the bars fill the axes from edge to edge.
        ax.legend(
            handles=[Patch(color=c, label=name) for name, c in seen.items()],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
    return step


def plot_gantt(
    run: Any,
    step: int | None = None,
    title: str | None = None,
    simulated: bool | None = None,
) -> Figure:
    """Gantt chart of one step of ``run`` (a RunResult or a timeline DataFrame).

    The title gives the bubble (measured, or simulated for a bare timeline) against the theory.
    A simulated timeline is in the time units of ``simulate_schedule`` (a forward takes 1).
    """
    tl = _timeline(run)
    simulated = not hasattr(run, "config") if simulated is None else simulated
    fig, ax = new_figure(width=8.0, height=1.4 + 0.7 * max(1, tl["rank"].nunique()))
    scale, unit = (1.0, "one forward = 1") if simulated else (1e3, "ms")
    drawn = draw_gantt(ax, tl, step, scale=scale, unit=unit)
    heading = bubble_title(run)
    if not simulated:
        heading += f" (step {drawn})"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10)
    return fig


def plot_gantts(
    runs: Mapping[str, Any],
    step: int | None = None,
    title: str | None = None,
    formulas: Mapping[str, float] | None = None,
) -> Figure:
    """Several Gantt charts stacked on one time axis: ``{label: RunResult or timeline}``.

    With a shared axis, a shorter chart means a faster step. ``formulas`` (label -> bubble
    fraction) replaces the GPipe/1F1B theory in the titles, for schedules with their own
    formula (``labkit.parallel.pp_orders.bubble_formula``).
    """
    n = len(runs)
    first = next(iter(runs.values()))
    simulated = not hasattr(first, "config")
    scale, unit = (1.0, "one forward = 1") if simulated else (1e3, "ms")
    p = max(_timeline(r)["rank"].nunique() for r in runs.values())
    fig, axes = new_figure(nrows=n, width=8.0, height=1.3 + 0.6 * p)
    axes = np.atleast_1d(axes)
    longest = 0.0
    shown: set[str] = set()  # phases already in a legend: a chart repeats it only if it adds one
    for ax, (label, run) in zip(axes, runs.items(), strict=True):
        phases = set(_timeline(run)["phase"])
        legend = not shown or bool(phases - shown)
        shown |= phases
        drawn = draw_gantt(ax, _timeline(run), step, scale=scale, unit=unit, legend=legend)
        events = _timeline(run)
        events = events[events["step"] == drawn]
        longest = max(longest, (events["end_s"].max() - events["start_s"].min()) * scale)
        heading = bubble_title(run, label)
        if formulas is not None and label in formulas:
            measured = bubble_fraction(_timeline(run))["bubble"].mean()
            kind = "measured" if hasattr(run, "config") else "simulated"
            heading = f"{label}: bubble {measured:.3f} {kind}, formula {formulas[label]:.3f}"
        ax.set_title(heading, fontsize=9, loc="left")
    for ax in axes:
        ax.set_xlim(0, longest * 1.01)
    if title:
        fig.suptitle(title)
    return fig


def draw_bubble_curve(ax: Axes, p: int, max_m: int = 8) -> None:
    """The theory ``(p - 1) / (m + p - 1)`` as a line for m = 1 .. ``max_m``."""
    m = np.linspace(1, max_m, 200)
    ax.plot(m, _theory(p, m), color="black", linewidth=1, label=f"theory (p-1)/(m+p-1), p={p}")
    ax.set_xlabel("micro-batches per step, m")
    ax.set_ylabel("bubble: idle fraction of the step")
    ax.set_ylim(0, max(0.6, float(_theory(p, 1)) + 0.1))


def plot_bubble_sweep(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Bubble and activation memory against m, per schedule (``sweep_table``'s rows).

    Left: the bubble measured on each rank (dots; the mean over ranks joined by a line) on the
    theory curve. Right: the most sequences whose activations stage 0 held at once; with the
    global batch fixed, GPipe always holds the whole batch while 1F1B holds at most ``p``
    micro-batches, fewer sequences as m grows.
    """
    fig, (left, right) = new_figure(ncols=2, width=5.0, height=3.4)
    p = int(table["rank"].nunique())
    schedules = list(dict.fromkeys(table["schedule"]))
    markers = {"pp-gpipe": "o", "pp-1f1b": "s"}
    for i, schedule in enumerate(schedules):
        rows = table[table["schedule"] == schedule]
        name, color = SCHEDULE_NAMES.get(schedule, schedule), f"C{i}"
        marker = markers.get(schedule, "^")
        left.plot(rows["micro_batches"], rows["bubble"], marker, color=color, alpha=0.35, ms=5)
        mean = rows.groupby("micro_batches")["bubble"].mean()
        left.plot(mean.index, mean.values, marker + "-", color=color, label=f"{name}, measured")
        stage0 = rows[rows["rank"] == 0].sort_values("micro_batches")
        right.plot(
            stage0["micro_batches"], stage0["peak_sequences"], marker + "-", color=color, label=name
        )
    draw_bubble_curve(left, p, int(table["micro_batches"].max()))
    left.set_title("Pipeline bubble (dots: each rank)")
    left.legend(fontsize=8)
    right.set_xlabel("micro-batches per step, m")
    right.set_ylabel("sequences with live activations")
    right.set_title("Activations held by stage 0 (peak)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(sorted(table["micro_batches"].unique()))
    if title:
        fig.suptitle(title)
    return fig


def plot_pipeline_try(
    run: Any, tries: pd.DataFrame, title: str | None = None, label: str | None = None
) -> Figure:
    """The pipeline panel's figure: the last step of ``run`` and every try's bubble so far.

    ``tries`` has one row per try: ``schedule``, ``micro_batches``, ``bubble`` (mean over ranks);
    ``label`` names the run in the chart's title (default: its schedule and m).
    """
    fig, (gantt, curve) = new_figure(ncols=2, width=5.0, height=3.2)
    gantt.get_gridspec().set_width_ratios([2, 1])  # the chart needs the width
    draw_gantt(gantt, run.timeline)
    gantt.set_title(bubble_title(run, label), fontsize=9, loc="left")
    p = int(run.timeline["rank"].nunique())
    draw_bubble_curve(curve, p, max(8, int(tries["micro_batches"].max()) if len(tries) else 8))
    for schedule, rows in tries.groupby("schedule", sort=False):
        name, color = SCHEDULE_NAMES.get(schedule, schedule), TRY_COLORS.get(schedule, "C9")
        curve.plot(rows["micro_batches"], rows["bubble"], "o", color=color, label=name)
    if len(tries):
        last = tries.iloc[-1]
        curve.plot(
            last["micro_batches"], last["bubble"], "o", ms=12, mfc="none", color="k", label="last"
        )
    curve.set_title("Every try so far", fontsize=9)
    curve.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
