"""Figures of notebook 06: the rank grid of a mesh, and meshes compared side by side."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from labkit.parallel.mesh import layout
from labkit.plots.common import new_figure

__all__ = ["plot_mesh", "plot_mesh_comparison"]

STAGE_COLORS = ("#cfe2f3", "#d9ead3", "#fff2cc", "#f4cccc", "#d9d2e9", "#fce5cd")


def plot_mesh(cfg: Any, title: str | None = None) -> Figure:
    """Every rank of ``cfg``'s mesh as a box: stages left to right, replicas top to bottom,
    tensor-parallel slices (and context-parallel pieces) side by side inside a replica. Each box
    names what the rank holds."""
    table = layout(cfg)
    # A stage's column holds cp x tp boxes: cp pieces of the sequence, each cut into tp slices.
    pp, dp, tp = cfg.pp, cfg.dp, cfg.tp * cfg.cp
    box_w, box_h, gap = 2.3, 1.25, 0.35
    fig, ax = new_figure(width=min(2.0 + 2.6 * pp * tp, 13.0), height=0.9 + 1.55 * dp)
    for rank, row in table.iterrows():
        x = (row["pp"] * tp + row["cp"] * cfg.tp + row["tp"]) * box_w + row["pp"] * gap
        y = -row["dp"] * (box_h + 0.25)
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                box_w - 0.12,
                box_h,
                boxstyle="round,pad=0.02",
                facecolor=STAGE_COLORS[row["pp"] % len(STAGE_COLORS)],
                edgecolor="0.3",
            )
        )
        text = (
            f"rank {rank}\n{row['layers']}\nbatch rows {row['rows']}"
            + (f"\nheads {row['heads']}" if cfg.tp > 1 else "")
            + (f"\ntokens {row['tokens']}" if cfg.cp > 1 else "")
        )
        ax.text(x + box_w / 2 - 0.06, y + box_h / 2, text, ha="center", va="center", fontsize=8.5)
    for s in range(pp):
        ax.text(
            s * (tp * box_w + gap) + tp * box_w / 2,
            box_h + 0.25,
            f"stage {s}",
            ha="center",
            fontsize=9,
            weight="bold",
        )
    for r in range(dp):
        ax.text(-0.15, -r * (box_h + 0.25) + box_h / 2, f"replica {r}", ha="right", va="center")
    ax.set_xlim(-1.5, pp * (tp * box_w + gap))
    ax.set_ylim(-(dp - 1) * (box_h + 0.25) - 0.2, box_h + 0.6)
    ax.set_axis_off()
    ax.set_title(title or f"{cfg.label}: {cfg.world_size} ranks, {cfg.model} GPT", fontsize=10)
    return fig


def plot_mesh_comparison(frame: pd.DataFrame, title: str | None = None) -> Figure:
    """Step time, peak parameter memory and bytes sent per dimension for each mesh (one bar)."""
    fig, axes = new_figure(ncols=3, width=3.9, height=0.9 + 0.42 * len(frame))
    y = np.arange(len(frame))
    labels = list(frame.index)
    axes[0].barh(y, frame["step_ms"], color="C0")
    axes[0].set_xlabel("step time (ms, measured)")
    axes[1].barh(y, frame["params_MiB"], color="C2")
    axes[1].set_xlabel("peak parameter MiB per rank (measured)")
    left = np.zeros(len(frame))
    for dim, color in (("dp", "C3"), ("pp", "C1"), ("tp", "C4")):
        values = frame[f"{dim}_KB"].to_numpy()
        axes[2].barh(y, values, left=left, color=color, label=dim)
        left += values
    axes[2].set_xlabel("KB sent per step by the busiest rank")
    axes[2].legend(fontsize=8, frameon=False)
    for i, ax in enumerate(axes):
        ax.set_yticks(y, labels if i == 0 else [""] * len(y), fontsize=8)
        ax.invert_yaxis()
    if title:
        fig.suptitle(title)
    return fig
