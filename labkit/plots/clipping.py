"""Figures for notebook 01, gradient clipping. Every function takes data and returns a Figure.

* ``plot_module_norms``: one bar per module, the gradient norm of one backward pass (log scale).
* ``plot_runs``: loss and gradient norm (before and after clipping) of several runs, side by side.
* ``plot_adam_replay``: norms replayed through AdamW: what it received, its step, its second moment.
* ``plot_layer_norm_heatmap``: per-module gradient norms, modules x steps (log colour scale).
* ``plot_clip_direction_2d``: a 2-D gradient clipped by norm and by value, as arrows.
* ``plot_norm_vs_value``: per-module norms after norm and value clipping of the same gradients.
* ``plot_spike``: a norm sequence with a spike, through a fixed threshold, AutoClip and ZClip.
* ``plot_clipping_run``: the widget's figure: loss, norms and heat map of one run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from labkit.lessons.clipping import DirectionComparison, first_nonfinite_step, module_grad_norms
from labkit.plots.common import new_figure
from labkit.plots.training import draw_grad_norm, log_if_wide, rank0

__all__ = [
    "plot_adam_replay",
    "plot_clip_direction_2d",
    "plot_clipping_run",
    "plot_layer_norm_heatmap",
    "plot_module_norms",
    "plot_norm_vs_value",
    "plot_runs",
    "plot_spike",
]


# ---------------------------------------------------------------------------------------------
# A single measurement: bars per module
# ---------------------------------------------------------------------------------------------


def plot_module_norms(modules: pd.DataFrame, title: str = "Gradient norm per layer") -> Figure:
    """Bars of ``grad_norm`` per ``module`` (a ``module_grad_norms`` table), log scale."""
    fig, ax = new_figure(width=8.0)
    ax.bar(range(len(modules)), modules["grad_norm"], color="C0")
    ax.set_xticks(range(len(modules)), modules["module"], rotation=90, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("module (input on the left, output on the right)")
    ax.set_ylabel("gradient 2-norm")
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------------------------
# Runs over time: loss, norms, heat map
# ---------------------------------------------------------------------------------------------


def _full_step_range(ax: Axes, runs: Mapping[str, Any]) -> None:
    """Show every step, also those after a divergence where nothing finite is left to draw."""
    steps = pd.concat([rank0(run)["step"] for run in runs.values()])
    ax.set_xlim(float(steps.min()) - 0.5, float(steps.max()) + 0.5)


SCALES = ("auto", "linear", "log")


def _set_scale(ax: Axes, scale: str, values: np.ndarray) -> None:
    """``auto``: log when the values span orders of magnitude (``log_if_wide``); else as named."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is invalid: allowed: {', '.join(map(repr, SCALES))}")
    if scale == "auto":
        log_if_wide(ax, values)
    else:
        ax.set_yscale(scale)


def _draw_loss(
    ax: Axes, runs: Mapping[str, Any], scale: str = "auto", validation: bool = False
) -> None:
    for i, (label, run) in enumerate(runs.items()):
        m = rank0(run)
        color = f"C{i}"
        ax.plot(m["step"], m["loss"], color=color, label=label)
        if validation and "val_loss" in m:
            val = m.dropna(subset=["val_loss"])
            ax.plot(val["step"], val["val_loss"], "o", color=color, label=f"{label}: validation")
        # A diverged loss turns into nan/inf, which a plot silently leaves out: mark where.
        bad = first_nonfinite_step(m)
        if bad is not None:
            ax.axvline(bad, color=color, linestyle=":", label=f"{label}: nan/inf from step {bad}")
    losses = pd.concat([rank0(run)["loss"] for run in runs.values()])
    _set_scale(ax, scale, losses.to_numpy(dtype=float))
    _full_step_range(ax, runs)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss")
    ax.legend(fontsize=8)


def _draw_norms(ax: Axes, runs: Mapping[str, Any], scale: str = "auto") -> None:
    draw_grad_norm(ax, runs)  # log when the norms span orders of magnitude
    if scale != "auto":
        _set_scale(ax, scale, np.array([]))
    _full_step_range(ax, runs)


def plot_runs(
    runs: Mapping[str, Any],
    title: str | None = None,
    scale: str = "auto",
    validation: bool = False,
) -> Figure:
    """Loss (left) and global gradient norm before/after clipping (right) of labelled runs.

    ``scale="auto"`` switches an axis to a log scale when its values span orders of magnitude
    (a divergence), which also squeezes runs that stayed close together into one line; pass
    ``scale="linear"`` (or ``"log"``) to fix both axes. ``validation=True`` adds each run's
    validation losses as dots. ``runs`` maps a label to a RunResult, a ToyRun or a metrics
    DataFrame. A run whose loss became nan/inf gets a dotted vertical line at the step where it did.
    """
    fig, (ax_loss, ax_norm) = new_figure(ncols=2)
    _draw_loss(ax_loss, runs, scale=scale, validation=validation)
    _draw_norms(ax_norm, runs, scale=scale)
    if title:
        fig.suptitle(title)
    return fig


def _module_matrix(layer_norms: pd.DataFrame) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Per-module norms as a [modules, steps] array, the module names and the steps."""
    table = module_grad_norms(layer_norms[layer_norms["rank"] == 0])
    modules = list(dict.fromkeys(table["module"]))
    wide = table.pivot(index="module", columns="step", values="grad_norm").loc[modules]
    return wide.to_numpy(dtype=float), modules, wide.columns.to_numpy()


def _draw_heatmap(ax: Axes, layer_norms: pd.DataFrame, title: str) -> None:
    if layer_norms.empty:
        ax.text(0.5, 0.5, "no per-layer norms\n(run with layer_norms=True)", ha="center")
        ax.set_axis_off()
        return
    values, modules, steps = _module_matrix(layer_norms)
    ok = np.isfinite(values) & (values > 0)
    # Log colours: norms span many orders of magnitude, and the explosion is the lesson.
    lo = float(values[ok].min()) if ok.any() else 1e-3
    hi = float(values[ok].max()) if ok.any() else 1.0
    image = ax.imshow(
        np.ma.masked_array(values, mask=~ok),
        aspect="auto",
        interpolation="nearest",
        norm=LogNorm(vmin=lo, vmax=max(hi, lo * 10)),
        cmap=colormaps["viridis"].with_extremes(bad="lightgrey"),  # grey: nan/inf gradients
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(modules) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="gradient 2-norm (grey: nan/inf)")


def plot_layer_norm_heatmap(
    layer_norms: pd.DataFrame, title: str = "Gradient norm per layer and step"
) -> Figure:
    """A heat map of per-module gradient norms (rows: modules, input at the top; columns: steps).

    ``layer_norms`` is ``RunResult.layer_norms`` (or ``ToyRun.layer_norms``): one row per
    parameter and step, grouped here into modules. Non-finite norms are drawn grey.
    """
    n_modules = layer_norms["name"].str.rsplit(".", n=1).str[0].nunique() if len(layer_norms) else 1
    fig, ax = new_figure(width=8.0, height=max(3.0, 0.16 * n_modules + 1.2))
    _draw_heatmap(ax, layer_norms, title)
    return fig


def plot_clipping_run(result: Any, title: str | None = None) -> Figure:
    """The clipping widget's figure for one run: loss, norms before/after, per-layer heat map."""
    fig, axes = new_figure(ncols=3, width=4.6, height=3.6)
    runs = {"run": result}
    _draw_loss(axes[0], runs)
    _draw_norms(axes[1], runs)
    _draw_heatmap(axes[2], getattr(result, "layer_norms", pd.DataFrame()), "Norm per layer")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------
# Direction: norm versus value clipping
# ---------------------------------------------------------------------------------------------


def plot_clip_direction_2d(
    grad: tuple[float, float] = (3.0, 0.6), max_norm: float = 1.0, clip_value: float = 0.5
) -> Figure:
    """A 2-D gradient, its norm-clipped and its value-clipped versions, drawn as arrows.

    Norm clipping shortens the arrow along the same line; value clipping clamps each coordinate,
    which turns it (the small coordinate now weighs as much as the large one).
    """
    g = np.asarray(grad, dtype=float)
    by_norm = g * min(1.0, max_norm / float(np.linalg.norm(g)))
    by_value = np.clip(g, -clip_value, clip_value)
    fig, ax = new_figure(width=5.0, height=3.4)

    def angle(v: np.ndarray) -> float:
        return math.degrees(math.atan2(v[1], v[0]))

    arrows = [
        (g, "grey", f"gradient, angle {angle(g):.0f}°"),
        (by_norm, "C0", f"clip by norm ({max_norm:g}), angle {angle(by_norm):.0f}°"),
        (by_value, "C3", f"clip by value ({clip_value:g}), angle {angle(by_value):.0f}°"),
    ]
    for vec, color, label in arrows:
        ax.annotate("", xy=vec, xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": color})
        ax.plot([0, vec[0]], [0, vec[1]], color=color, label=label)
    # The circle of radius max_norm: every norm-clipped gradient ends on or inside it.
    theta = np.linspace(0, 2 * np.pi, 200)
    ax.plot(max_norm * np.cos(theta), max_norm * np.sin(theta), color="C0", linestyle=":")
    ax.set_aspect("equal")
    ax.set_xlim(-0.2, g[0] + 0.3)
    ax.set_ylim(-0.2, max(g[1], max_norm) + 0.6)
    ax.set_xlabel("gradient of parameter 1")
    ax.set_ylabel("gradient of parameter 2")
    ax.set_title("Norm clipping keeps the direction; value clipping turns it")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def plot_norm_vs_value(comparison: DirectionComparison) -> Figure:
    """Per-module gradient norms: original, clipped by norm, clipped by value (same global norm)."""
    m = comparison.modules
    fig, ax = new_figure(width=8.0)
    x = range(len(m))
    ax.plot(x, m["original"], color="grey", marker=".", label="original")
    ax.plot(
        x,
        m["norm"],
        color="C0",
        marker=".",
        label=f"clip by norm (max_norm={comparison.max_norm:g}), "
        f"cosine {comparison.cosine_norm:.3f}",
    )
    ax.plot(
        x,
        m["value"],
        color="C3",
        marker=".",
        label=f"clip by value ({comparison.clip_value:.2g}), cosine {comparison.cosine_value:.3f}",
    )
    ax.set_xticks(list(x), m["module"], rotation=90, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("module (input on the left)")
    ax.set_ylabel("gradient 2-norm")
    ax.set_title("Same global norm after clipping, different directions")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# An injected spike
# ---------------------------------------------------------------------------------------------


def plot_spike(table: pd.DataFrame, max_norm: float, spike_at: int | None = None) -> Figure:
    """Three panels, one per clipper: the norms before (grey) and after clipping (colour).

    ``table`` is ``labkit.lessons.clipping.spike_table``'s output; ``max_norm`` the fixed threshold.
    """
    fig, axes = new_figure(ncols=3, width=4.2, height=3.2)
    panels = [
        ("fixed", f"fixed threshold (max_norm={max_norm:g})", "C0"),
        ("autoclip", "AutoClip (10th percentile of history)", "C1"),
        ("zclip", "ZClip (z-score against an EMA)", "C2"),
    ]
    top = max(float(table["pre_clip"].max()), max_norm) * 1.5  # headroom for the legend
    for ax, (column, title, color) in zip(axes, panels, strict=True):
        ax.plot(table["step"], table["pre_clip"], color="grey", label="before clipping")
        ax.plot(table["step"], table[column], color=color, label="after clipping")
        if column == "fixed":
            ax.axhline(max_norm, color=color, linestyle="--", label="threshold")
        if spike_at is not None:
            after = float(table.loc[table["step"] == spike_at, column].iloc[0])
            ax.annotate(
                f"spike -> {after:.2f}",
                xy=(spike_at, after),
                xytext=(spike_at - 45, top * 0.55),
                arrowprops={"arrowstyle": "->", "color": color},
                fontsize=8,
            )
        ax.set_ylim(0, top)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("global gradient 2-norm")
    return fig


# ---------------------------------------------------------------------------------------------
# AdamW: the step per coordinate and the second moment
# ---------------------------------------------------------------------------------------------


def plot_adam_replay(replays: Mapping[str, pd.DataFrame], spike_at: int | None = None) -> Figure:
    """Three panels over ``adam_replay`` tables, one line per label: the norm AdamW received
    (after clipping), its step per coordinate in units of lr, and its second moment ``sqrt(v)``.
    """
    fig, axes = new_figure(ncols=3, width=4.2, height=3.2)
    panels = [
        ("grad_norm", "gradient norm AdamW received", "Gradient (after clipping)"),
        ("step_over_lr", "step per coordinate / lr", "AdamW's step"),
        ("sqrt_v", "sqrt(v): the size AdamW divides by", "Second-moment estimate"),
    ]
    for ax, (column, ylabel, title) in zip(axes, panels, strict=True):
        for i, (label, table) in enumerate(replays.items()):
            ax.plot(table["step"], table[column], color=f"C{i % 10}", label=label)
        if column == "step_over_lr":
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="lr")
            ax.set_ylim(0, 1.25)
        else:
            ax.set_ylim(bottom=0)
        if spike_at is not None:
            ax.axvline(spike_at, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return fig
