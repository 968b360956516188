"""Figures for notebook 02, learning-rate schedules and warm-up. Every function returns a Figure.

* ``plot_lr_curves``: LR against optimizer step for one or more schedules (the designer's figure).
* ``plot_warmup_grid``: the warm-up experiment: loss curves of {pre-LN, post-LN} x {no warm-up,
  warm-up}, one panel per norm placement, and the LR each run used underneath.
* ``plot_seed_spread``: final losses over seeds, one dot per run, a seed's runs joined by a line,
  the mean as a bar (the warm-up experiment on tuning and confirmation seeds, cosine vs WSD).
* ``plot_schedule_runs``: loss and LR of a few runs that differ only in their schedule
  (cosine vs WSD).
* ``plot_untuned_warmup``: Ma & Yarats' untuned warm-up factor for several values of Adam's beta2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from labkit.plots.common import new_figure
from labkit.schedules import Schedule, get_schedule

__all__ = [
    "plot_lr_curves",
    "plot_schedule_runs",
    "plot_seed_spread",
    "plot_untuned_warmup",
    "plot_warmup_grid",
    "smooth",
]


def smooth(values: Sequence[float] | pd.Series, window: int = 10) -> np.ndarray:
    """Trailing moving average over ``window`` steps (shorter at the start), for noisy losses.

    The loss of one small batch jumps around by a few tenths; averaging ~10 steps shows the trend
    without shifting it much.
    """
    series = pd.Series(np.asarray(values, dtype=float))
    return series.rolling(max(1, window), min_periods=1).mean().to_numpy()


def _rank0(run: Any) -> pd.DataFrame:
    """Rank 0's metric rows of a RunResult (every rank logs the same loss and LR)."""
    m = run.metrics
    return m[m["rank"] == 0]


def _one_seed(runs: Mapping[tuple, Any], seed: int | None) -> dict[tuple, Any]:
    """Runs keyed ``(..., seed)`` (3-tuples for the warm-up grid, 2-tuples for schedules): those of
    ``seed`` (default: the first seed) keyed without it; other mappings are returned as they are."""
    keys = list(runs)
    if not keys or not isinstance(keys[0][-1], int):
        return dict(runs)
    chosen = keys[0][-1] if seed is None else seed
    return {key[:-1]: run for key, run in runs.items() if key[-1] == chosen}


def plot_lr_curves(
    curves: Mapping[str, Sequence[float] | Schedule],
    *,
    highlight: str | None = None,
    title: str = "Learning rate per optimizer step",
    logy: bool = False,
) -> Figure:
    """LR against optimizer step, one line per entry of ``curves`` (label -> LRs or Schedule).

    ``highlight`` names the entry drawn thick and black (the designer's current schedule); the
    others are thinner, in colour, for comparison.
    """
    fig, ax = new_figure(width=7.5, height=3.4)
    for i, (label, curve) in enumerate(curves.items()):
        values = curve.curve() if isinstance(curve, Schedule) else list(curve)
        if label == highlight:
            ax.plot(values, color="black", linewidth=2.4, label=label, zorder=3)
        else:
            ax.plot(values, color=f"C{i % 10}", linewidth=1.4, alpha=0.85, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_warmup_grid(
    runs: Mapping[tuple[str, str], Any] | Mapping[tuple[str, str, int], Any],
    *,
    seed: int | None = None,
    window: int = 10,
    plateau: float | None = None,
    title: str | None = None,
) -> Figure:
    """Loss curves of the warm-up experiment: ``runs[(norm, warm-up label)] -> RunResult``, or
    ``runs[(norm, label, seed)]`` as ``warmup_experiment(runs=...)`` keeps them (then only the
    runs of ``seed`` are drawn, by default the first seed's).

    One column per norm placement ("pre", "post"), each with one line per warm-up setting (the
    training loss smoothed over ``window`` steps, the raw loss faintly behind it). A small panel
    under each shows the LR the runs used, so the warm-up is visible next to its effect.
    ``plateau`` (e.g. the unigram loss) is drawn as a dashed line. The loss axis stops a little
    above the initial loss; a spike above it is marked with an arrow and its height.
    """
    runs = _one_seed(runs, seed)
    norms = list(dict.fromkeys(norm for norm, _ in runs))
    labels = list(dict.fromkeys(label for _, label in runs))
    fig, axes = new_figure(ncols=len(norms), nrows=2, width=5.0, height=2.6)
    axes = np.asarray(axes).reshape(2, len(norms))
    frames = {key: _rank0(run) for key, run in runs.items()}
    # Every run starts from the same initial loss: show a little above it, down to the best.
    top = max(float(m["loss"].iloc[0]) for m in frames.values()) + 0.5
    smoothed = np.concatenate([smooth(m["loss"], window) for m in frames.values()])
    smoothed = smoothed[np.isfinite(smoothed)]
    bottom = float(smoothed.min()) - 0.2 if len(smoothed) else 0.0
    for j, norm in enumerate(norms):
        ax_loss, ax_lr = axes[0, j], axes[1, j]
        for i, label in enumerate(labels):
            if (norm, label) not in frames:
                continue
            m = frames[(norm, label)]
            color = f"C{i}"
            ax_loss.plot(m["step"], m["loss"], color=color, alpha=0.2, linewidth=0.8)
            ax_loss.plot(m["step"], smooth(m["loss"], window), color=color, label=label)
            ax_lr.plot(m["step"], m["lr"], color=color, label=label)
            # Keep the axis readable, but do not hide a spike: point at it and give its height.
            high = m[m["loss"] > top]
            if len(high):
                worst = high.loc[high["loss"].idxmax()]
                ax_loss.annotate(
                    f"spike: {worst['loss']:.3g}",
                    xy=(worst["step"], top),
                    xytext=(worst["step"] + 0.08 * len(m), top - 0.35),
                    arrowprops={"arrowstyle": "->", "color": color},
                    color=color,
                    fontsize=8,
                )
        if plateau is not None:
            ax_loss.axhline(
                plateau, color="gray", linestyle="--", linewidth=1, label="unigram loss"
            )
        ax_loss.set_ylim(bottom, top)
        ax_loss.set_title(f"{norm}-LN GPT")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend(fontsize=8)
        ax_loss.grid(alpha=0.3)
        ax_lr.set_xlabel("optimizer step")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_ylim(bottom=0)
        ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_schedule_runs(
    runs: Mapping[str, Any] | Mapping[tuple[str, int], Any],
    *,
    seed: int | None = None,
    window: int = 10,
    title: str = "Same steps, different schedule",
) -> Figure:
    """Loss (smoothed over ``window`` steps, validation points as markers) and LR of several runs.

    ``runs`` maps a label to a RunResult, or ``(label, seed)`` to one as
    ``schedule_experiment(runs=...)`` keeps them (then the runs of ``seed``, by default the first
    seed's, are drawn); the runs should differ only in their schedule.
    """
    fig, (ax_loss, ax_lr) = new_figure(ncols=2, width=5.0, height=3.2)
    chosen = _one_seed({k if isinstance(k, tuple) else (k,): r for k, r in runs.items()}, seed)
    for i, ((label,), run) in enumerate(chosen.items()):
        m = _rank0(run)
        ax_loss.plot(m["step"], smooth(m["loss"], window), color=f"C{i}", label=f"{label} (train)")
        val = m.dropna(subset=["val_loss"])
        if len(val):
            ax_loss.plot(
                val["step"],
                val["val_loss"],
                "o--",
                color=f"C{i}",
                markersize=4,
                linewidth=0.8,
                label=f"{label} (validation)",
            )
        ax_lr.plot(m["step"], m["lr"], color=f"C{i}", label=label)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_ylim(bottom=0)
    ax_lr.set_title("Learning rate")
    ax_lr.legend(fontsize=8)
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_seed_spread(
    tables: Mapping[str, pd.DataFrame],
    by: Sequence[str],
    *,
    value: str = "validation loss",
    plateau: float | None = None,
    title: str | None = None,
) -> Figure:
    """Final ``value`` of every run, one panel per table (e.g. tuning and confirmation seeds).

    Each table has one row per run with the columns ``by`` and ``seed`` (as ``warmup_experiment``
    and ``schedule_experiment`` return). The x axis has one position per combination of ``by``;
    a seed's runs that share all but the last of ``by`` (e.g. one norm, with and without warm-up)
    are joined by a thin line, so a paired difference reads as a slope; the mean over seeds is a
    black bar. ``plateau`` (e.g. the unigram loss) is drawn dashed.
    """
    by = list(by)
    fig, axes = new_figure(ncols=len(tables), width=4.6, height=3.4)
    axes = np.atleast_1d(axes)
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        groups = list(dict.fromkeys(map(tuple, table[by].to_numpy())))
        where = {group: i for i, group in enumerate(groups)}
        families = list(dict.fromkeys(group[:-1] for group in groups))
        for seed, rows in table.groupby("seed", sort=True):
            x = [where[tuple(r)] for r in rows[by].to_numpy()]
            y = rows[value].to_numpy(dtype=float)
            keys = [tuple(r)[:-1] for r in rows[by].to_numpy()]
            for family in families:
                idx = [i for i, k in enumerate(keys) if k == family]
                color = f"C{families.index(family) % 10}"
                ax.plot([x[i] for i in idx], y[idx], "o-", color=color, alpha=0.6, markersize=4)
            ax.annotate(
                str(seed),
                (x[-1], y[-1]),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=6,
                color="gray",
                va="center",
            )
        means = table.groupby(by, sort=False)[value].mean()
        for group, mean in means.items():
            g = group if isinstance(group, tuple) else (group,)
            ax.hlines(mean, where[g] - 0.25, where[g] + 0.25, color="black", linewidth=2)
        if plateau is not None:
            ax.axhline(plateau, color="gray", linestyle="--", linewidth=1, label="unigram loss")
            ax.legend(fontsize=8, loc="lower left")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["\n".join(map(str, g)) for g in groups], fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_ylabel(value)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    # One scale for every panel, so that the seed sets compare at a glance.
    low = min(ax.get_ylim()[0] for ax in axes)
    high = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(low, high)
    if title:
        fig.suptitle(title)
    return fig


def plot_untuned_warmup(
    beta2s: Sequence[float] = (0.98, 0.99, 0.995, 0.999),
    *,
    total_steps: int = 5000,
    kinds: Sequence[str] = ("untuned_linear", "untuned_exponential"),
) -> Figure:
    """The untuned warm-up factor (LR / peak LR) of Ma & Yarats 2019 for several Adam beta2.

    Solid lines: ``untuned_linear`` (2/(1-beta2) steps); dashed: ``untuned_exponential`` (time
    constant 1/(1-beta2)). A constant schedule is used so that only the warm-up shows.
    """
    fig, ax = new_figure(width=7.5, height=3.4)
    styles = {"untuned_linear": "-", "untuned_exponential": "--"}
    for i, beta2 in enumerate(beta2s):
        for kind in kinds:
            sched = get_schedule(
                "constant", peak_lr=1.0, total_steps=total_steps, warmup=kind, beta2=beta2
            )
            short = "linear" if kind == "untuned_linear" else "exponential"
            ax.plot(
                sched.curve(),
                styles[kind],
                color=f"C{i}",
                label=f"beta2={beta2}, {short} ({sched.warmup_length:g} steps)"
                if kind == "untuned_linear"
                else f"beta2={beta2}, {short}",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LR / peak LR")
    ax.set_ylim(0, 1.05)
    ax.set_title("Untuned warm-up (Ma & Yarats 2019): the length comes from Adam's beta2")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig
