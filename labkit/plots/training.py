"""Figures of a training run that every notebook can use. Each function takes data, returns a Figure.

* ``draw_loss``, ``draw_lr``, ``draw_grad_norm``, ``draw_throughput``: draw one quantity of one or
  more runs onto an existing ``Axes`` (the live plot and the panels reuse them).
* ``plot_loss``: training loss (lines) and validation loss (dots) of labelled runs.
* ``plot_run``: the four-panel overview of one run: loss, learning rate, gradient norm before and
  after clipping, and tokens per second on every rank.

A "run" is a ``RunResult`` or a metrics ``DataFrame`` (one row per step and rank); several runs are
passed as a mapping ``{label: run}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from labkit.plots.common import new_figure

__all__ = [
    "as_runs",
    "draw_grad_norm",
    "draw_loss",
    "draw_lr",
    "draw_throughput",
    "plot_loss",
    "plot_run",
    "rank0",
]

Runs = Mapping[str, Any]


def rank0(run: Any) -> pd.DataFrame:
    """The metrics rows of rank 0 (every rank reports the same global loss, LR and norms)."""
    frame = run.metrics if hasattr(run, "metrics") else pd.DataFrame(run)
    if "rank" in frame and len(frame):
        frame = frame[frame["rank"] == 0]
    return frame


def as_runs(runs: Any, label: str = "run") -> dict[str, Any]:
    """``runs`` as a ``{label: run}`` dict: a single run becomes ``{label: run}``."""
    if isinstance(runs, Mapping):
        return dict(runs)
    return {label: runs}


def log_if_wide(ax: Axes, values: np.ndarray) -> None:
    """Log y-scale when the finite values span more than a factor 30 (an explosion).

    A healthy run reads better on plain numbers.
    """
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 30:
        ax.set_yscale("log")


def draw_loss(ax: Axes, runs: Runs, target: float | None = None) -> None:
    """Training loss as lines and validation loss as dots of the same colour; optional target."""
    for i, (label, run) in enumerate(runs.items()):
        m = rank0(run)
        color = f"C{i % 10}"
        ax.plot(m["step"], m["loss"], color=color, alpha=0.8, label=f"{label}: train")
        if "val_loss" in m:
            val = m.dropna(subset=["val_loss"])
            ax.plot(val["step"], val["val_loss"], "o", color=color, label=f"{label}: validation")
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title("Loss")
    if runs or target is not None:
        ax.legend(fontsize=8)


def draw_lr(ax: Axes, runs: Runs) -> None:
    """The learning rate the optimizer used at each step (warm-up and decay show here)."""
    for i, (label, run) in enumerate(runs.items()):
        m = rank0(run)
        ax.plot(m["step"], m["lr"], color=f"C{i % 10}", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if len(runs) > 1:
        ax.legend(fontsize=8)


def draw_grad_norm(ax: Axes, runs: Runs) -> None:
    """Global gradient norm before clipping (solid) and after clipping (dashed)."""
    values = []
    for i, (label, run) in enumerate(runs.items()):
        m = rank0(run)
        color = f"C{i % 10}"
        ax.plot(m["step"], m["grad_norm"], color=color, label=f"{label}: before clipping")
        ax.plot(
            m["step"],
            m["grad_norm_clipped"],
            color=color,
            linestyle="--",
            label=f"{label}: after clipping",
        )
        values.append(m[["grad_norm", "grad_norm_clipped"]].to_numpy(dtype=float).ravel())
    log_if_wide(ax, np.concatenate(values) if values else np.array([]))
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient 2-norm")
    ax.set_title("Gradient norm")
    ax.legend(fontsize=8)


def draw_throughput(ax: Axes, run: Any) -> None:
    """Tokens per second that each rank processed at each step (one line per rank)."""
    frame = run.metrics if hasattr(run, "metrics") else pd.DataFrame(run)
    for rank, rows in frame.groupby("rank"):
        ax.plot(
            rows["step"], rows["tokens_per_s"], color=f"C{int(rank) % 10}", label=f"rank {rank}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s (this rank)")
    ax.set_title("Throughput per rank")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def plot_loss(runs: Any, target: float | None = None, title: str | None = None) -> Figure:
    """Training and validation loss of one run or of ``{label: run}``; optional target line."""
    fig, ax = new_figure(width=7.0)
    draw_loss(ax, as_runs(runs), target=target)
    if title:
        ax.set_title(title)
    return fig


def plot_run(result: Any, title: str | None = None) -> Figure:
    """Four panels of one run: loss, learning rate, gradient norm and per-rank throughput."""
    fig, axes = new_figure(ncols=2, nrows=2, width=5.5, height=3.0)
    runs = {"": result}
    draw_loss(axes[0], runs)
    draw_lr(axes[1], runs)
    draw_grad_norm(axes[2], runs)
    draw_throughput(axes[3], result)
    # The single run needs no label in the legends: strip the leading ": ".
    for ax in axes[:3]:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, [label.removeprefix(": ") for label in labels], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
