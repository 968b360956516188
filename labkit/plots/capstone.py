"""Figures for notebook 07, the capstone. Every function takes data and returns a Figure.

* ``plot_wall_breakdown``: where the wall time of each run went: start-up and evaluation versus
  the training steps themselves.
* ``plot_challenge``: the challenge board: validation loss of every try against the target, and
  every try as a point (wall time, final validation loss): the lower left corner wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from labkit.plots.common import new_figure
from labkit.plots.training import rank0

__all__ = ["plot_challenge", "plot_wall_breakdown", "wall_breakdown"]


def wall_breakdown(result: Any) -> dict[str, float]:
    """Seconds of ``result``'s wall time spent in training steps and everywhere else.

    "Training steps" sums rank 0's ``step_time_s``; "other" is the rest of ``info["wall_s"]``:
    starting processes, building the model, evaluation, gathering the results.
    """
    wall = float(result.info["wall_s"])
    steps = float(rank0(result)["step_time_s"].sum())
    return {"wall_s": wall, "steps_s": steps, "other_s": max(0.0, wall - steps)}


def plot_wall_breakdown(runs: Mapping[str, Any], title: str = "Where the time went") -> Figure:
    """Horizontal stacked bars, one per labelled run: training steps, then everything else."""
    fig, ax = new_figure(width=7.0, height=0.6 * len(runs) + 1.4)
    labels = list(runs)
    parts = [wall_breakdown(runs[label]) for label in labels]
    steps = [p["steps_s"] for p in parts]
    other = [p["other_s"] for p in parts]
    ax.barh(labels, steps, color="C0", label="training steps")
    ax.barh(labels, other, left=steps, color="C7", label="start-up, evaluation, results")
    ax.invert_yaxis()  # first run on top, in the order given
    ax.set_xlabel("wall time (s)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_challenge(
    curves: Mapping[str, pd.DataFrame], results: pd.DataFrame, target: float
) -> Figure:
    """The challenge board.

    Left: validation loss against step for every try (``curves`` maps a label to its metrics),
    with the target as a dashed line. Right: each row of ``results`` (columns ``try``,
    ``wall_s``, ``final_val_loss``, ``reached``) as a point: green if it reached the target,
    red if not. The fastest try that reached the target is circled.
    """
    fig, (ax_curve, ax_board) = new_figure(ncols=2, width=5.5, height=3.4)
    for i, (label, metrics) in enumerate(curves.items()):
        val = rank0(metrics).dropna(subset=["val_loss"])
        ax_curve.plot(val["step"], val["val_loss"], "o-", color=f"C{i % 10}", label=label)
    for ax in (ax_curve, ax_board):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("validation loss")
    ax_curve.set_title("Validation loss of each try")
    ax_curve.legend(fontsize=7)

    if len(results):
        colors = ["tab:green" if ok else "tab:red" for ok in results["reached"]]
        ax_board.scatter(results["wall_s"], results["final_val_loss"], c=colors, zorder=3)
        for _, row in results.iterrows():
            ax_board.annotate(
                f"#{row['try']}",
                (row["wall_s"], row["final_val_loss"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        winners = results[results["reached"]]
        if len(winners):
            best = winners.loc[winners["wall_s"].idxmin()]
            ax_board.scatter(
                [best["wall_s"]],
                [best["final_val_loss"]],
                s=220,
                facecolors="none",
                edgecolors="tab:green",
                linewidths=2,
                label=f"fastest to target: #{best['try']}",
            )
        # Room on the right for the last label; 0 on the left, since the wall time is the score.
        ax_board.set_xlim(0, 1.15 * float(results["wall_s"].max()))
    ax_board.set_xlabel("wall time of the run (s)")
    ax_board.set_ylabel("final validation loss")
    ax_board.set_title("Tries: lower left wins (green = reached)")
    ax_board.legend(fontsize=7)
    return fig
