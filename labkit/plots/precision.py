"""Figures of notebook 08: memory per category, recomputation's trade, precision runs, fp16's
range, and one profiler trace as a picture."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from labkit.lessons.precision import FP16_MAX, FP16_SMALLEST, FP16_SMALLEST_NORMAL, fp16_fate
from labkit.plots.common import new_figure
from labkit.result import RunResult

__all__ = [
    "plot_fp16_range",
    "plot_memory_breakdown",
    "plot_precision_runs",
    "plot_recompute",
    "plot_trace",
]

MIB = 2**20
KIND_COLORS = {
    "matmul": "C0",
    "attention": "C2",
    "communication": "C3",
    "optimizer": "C1",
    "other": "0.75",
}


def plot_memory_breakdown(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Measured bytes per category (bars) and the model-state formula (black ticks)."""
    fig, ax = new_figure(width=5.6, height=3.0)
    x = np.arange(len(table))
    ax.bar(x, table["measured_bytes"] / MIB, color=["C0", "C1", "C2", "C4"][: len(x)], width=0.6)
    ax.plot(x, table["formula_bytes"] / MIB, "_", color="black", ms=30, mew=2, label="formula")
    for xi, value in zip(x, table["measured_bytes"], strict=True):
        ax.text(xi, value / MIB, f"{value / MIB:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, table["category"])
    ax.set_ylabel("MiB (measured)")
    ax.legend(fontsize=8)
    ax.set_title(title or "Where one step's memory goes", fontsize=10)
    return fig


def plot_recompute(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Activation bytes and step time per recompute mode, both measured."""
    fig, (ax_mem, ax_time) = new_figure(ncols=2, width=3.4, height=2.8)
    x = np.arange(len(table))
    ax_mem.bar(x, table["activations_bytes"] / MIB, color="C4", width=0.6)
    ax_time.bar(x, table["step_ms"], color="C0", width=0.6)
    for ax, label in ((ax_mem, "activations saved (MiB)"), (ax_time, "step time (ms, median)")):
        ax.set_xticks(x, table.index)
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_precision_runs(
    runs: Mapping[tuple[str, int], RunResult], title: str | None = None
) -> Figure:
    """Left: training loss per precision, the mean over seeds and the band from min to max.
    Right: each precision's loss minus fp32's on the same seed (mean and band over seeds)."""
    fig, (ax, ax_diff) = new_figure(ncols=2, width=4.2, height=3.0)
    precisions = list(dict.fromkeys(p for p, _ in runs))

    def losses(p: str) -> pd.DataFrame:
        return pd.concat(
            {s: r.losses.reset_index(drop=True) for (q, s), r in runs.items() if q == p}, axis=1
        )

    base = losses("fp32") if "fp32" in precisions else None
    for i, p in enumerate(precisions):
        mine = losses(p)
        steps = np.arange(len(mine))
        ax.plot(steps, mine.mean(axis=1), color=f"C{i}", label=p, lw=1.4)
        ax.fill_between(steps, mine.min(axis=1), mine.max(axis=1), color=f"C{i}", alpha=0.2)
        if base is not None and p != "fp32":
            diff = mine - base[mine.columns]
            ax_diff.plot(steps, diff.mean(axis=1), color=f"C{i}", label=f"{p} - fp32", lw=1.2)
            ax_diff.fill_between(
                steps, diff.min(axis=1), diff.max(axis=1), color=f"C{i}", alpha=0.2
            )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.set_title("loss (band: min to max over seeds)", fontsize=10)
    ax_diff.axhline(0, color="black", lw=0.8)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("loss difference, same seed")
    ax_diff.legend(fontsize=8)
    ax_diff.set_title("difference from fp32", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_fp16_range(magnitudes: np.ndarray, scale: float = 1.0) -> Figure:
    """Histogram of gradient magnitudes times ``scale`` against fp16's representable range."""
    fig, ax = new_figure(width=6.0, height=2.8)
    scaled = magnitudes * scale
    bins = np.logspace(-14, 10, 97)
    ax.hist(np.clip(scaled, bins[0], bins[-1]), bins=bins, color="C0")
    ax.set_xscale("log")
    ax.axvspan(bins[0], FP16_SMALLEST / 2, color="C3", alpha=0.15, label="fp16: becomes 0")
    ax.axvspan(
        FP16_SMALLEST / 2, FP16_SMALLEST_NORMAL, color="C4", alpha=0.12, label="fp16: subnormal"
    )
    ax.axvspan(FP16_MAX, bins[-1], color="C1", alpha=0.2, label="fp16: becomes inf")
    fate = fp16_fate(magnitudes, scale)
    ax.set_title(
        f"gradients x {scale:g}: {100 * fate['flushed_to_zero']:.2f}% to zero, "
        f"{100 * fate['subnormal']:.1f}% subnormal, {100 * fate['overflow']:.2f}% overflow",
        fontsize=10,
    )
    ax.set_xlabel("|gradient| x loss scale")
    ax.set_ylabel("values")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def plot_trace(ops: pd.DataFrame, title: str | None = None) -> Figure:
    """One lane per thread of a trace's top-level operations, coloured by kind."""
    threads = sorted(ops["thread"].unique())
    fig, ax = new_figure(width=9.0, height=1.5 + 0.5 * len(threads))
    for kind, group in ops.groupby("kind"):
        for thread, lane in group.groupby("thread"):
            ax.broken_barh(
                list(zip(lane["start_ms"], lane["dur_ms"], strict=True)),
                (thread - 0.4, 0.8),
                color=KIND_COLORS.get(kind, "0.5"),
            )
        ax.bar(0, 0, color=KIND_COLORS.get(kind, "0.5"), label=kind)  # legend entry
    only_comm = ops.groupby("thread")["kind"].agg(lambda k: set(k) == {"communication"})
    names = [
        "training loop" if t == 0 else (f"Gloo thread {t}" if only_comm[t] else f"thread {t}")
        for t in threads
    ]
    ax.set_yticks(threads, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_xlim(0, float((ops["start_ms"] + ops["dur_ms"]).max()) * 1.01)
    fig.legend(fontsize=8, ncols=5, loc="outside lower center")
    ax.set_title(title or "One rank's profiler trace (top-level operations)", fontsize=10)
    return fig
