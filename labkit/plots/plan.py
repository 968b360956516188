"""Figures of notebook 09: a plan's time and memory breakdowns, and predictions against runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from labkit.plan.predict import Prediction
from labkit.plots.common import new_figure

__all__ = ["plot_breakdown", "plot_validation"]

_TIME = ("compute", "bubble", "exposed communication", "optimizer")
_MEMORY = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "transient_bytes")


def plot_breakdown(predictions: Sequence[Prediction], title: str = "") -> Figure:
    """Per plan: where a step's time goes (left) and what fills a GPU (right), with the card's
    memory as a line; plans that do not fit are marked."""
    fig, (left, right) = new_figure(2, width=6.0, height=0.45 * len(predictions) + 1.6)
    labels = [
        f"{p.workload.label}, rc={p.workload.recompute}" + ("" if p.fits else "  (does not fit)")
        for p in predictions
    ]
    y = np.arange(len(predictions))
    start = np.zeros(len(predictions))
    for part, color in zip(_TIME, ("#4c72b0", "#dd8452", "#c44e52", "#8172b3"), strict=True):
        values = np.array([p.time[part] for p in predictions])
        left.barh(y, values, left=start, label=part, color=color)
        start += values
    left.set_yticks(y, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("predicted seconds per optimizer step")
    left.legend(fontsize=7, loc="lower right")
    start = np.zeros(len(predictions))
    colors = ("#55a868", "#8c8c8c", "#64b5cd", "#ccb974", "#da8bc3")
    for part, color in zip(_MEMORY, colors, strict=True):
        values = np.array([p.memory[part] for p in predictions]) / 2**30
        right.barh(y, values, left=start, label=part.removesuffix("_bytes"), color=color)
        start += values
    card = predictions[0].cluster.card
    right.axvline(card.memory_bytes / 2**30, color="k", ls="--", lw=1)
    right.text(card.memory_bytes / 2**30, -0.6, f" {card.name} memory", fontsize=7)
    right.set_yticks(y, [""] * len(y))
    right.invert_yaxis()
    right.set_xlabel("predicted GiB per GPU (fullest rank)")
    right.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_validation(table: pd.DataFrame) -> Figure:
    """Predicted against measured step time (left) and memory (right), one point per run, with
    the line of perfect agreement and the +-25% (time) and +-10% (memory) bands."""
    fig, (left, right) = new_figure(2, width=4.6, height=3.8)
    for ax, (pred, meas, band, unit) in zip(
        (left, right),
        (
            ("predicted_step_ms", "measured_step_ms", 0.25, "step time (ms)"),
            ("predicted_MiB", "measured_MiB", 0.10, "peak memory (MiB)"),
        ),
        strict=True,
    ):
        for model, part in table.groupby("model"):
            ax.scatter(part[meas], part[pred], s=18, label=model)
        lo = min(table[meas].min(), table[pred].min()) * 0.8
        hi = max(table[meas].max(), table[pred].max()) * 1.25
        line = np.array([lo, hi])
        ax.plot(line, line, color="k", lw=1)
        ax.fill_between(line, line * (1 - band), line * (1 + band), color="0.85", zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"predicted {unit}")
        ax.set_title(f"grey: within {band:.0%}", fontsize=9)
        ax.legend(fontsize=8)
    return fig
