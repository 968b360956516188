"""Figures for notebook 05: tensor parallelism, and memory and communication per strategy.

* ``plot_matmul_split``: ``Y = X W`` split by columns of W (concatenate) and by rows (sum).
* ``plot_tp_mlp_diagram``: Megatron's MLP on two ranks, and where ``f`` and ``g`` all-reduce.
* ``plot_tp_breakdown``: a ``tp`` run's step time (compute, all-reduce, rest) and bytes per rank.
* ``plot_strategies``: measured memory and bytes sent per rank, with the formulas as ticks.
* ``plot_plan``: the formulas alone, for any preset and world size (the busiest rank of each).
* ``plot_context_parallel``: activations per rank and ring traffic against cp, with predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from labkit.lessons.parallelism import STRATEGY_LABELS, busiest_rank
from labkit.plots.common import new_figure

__all__ = [
    "plot_context_parallel",
    "plot_matmul_split",
    "plot_plan",
    "plot_strategies",
    "plot_tp_breakdown",
    "plot_tp_mlp_diagram",
]

MIB, MB = 2**20, 1e6
RANK_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7")
PARTS = (
    ("params_bytes", "parameters", "C0"),
    ("grads_bytes", "gradients", "C1"),
    ("optimizer_bytes", "optimizer state", "C2"),
)


# ---------------------------------------------------------------------------------------------
# Splitting a matrix multiply
# ---------------------------------------------------------------------------------------------


def _matrix(ax: Axes, m: torch.Tensor, left: float, label: str) -> float:
    """Draw ``m`` as a heat map with its top-left corner at ``(left, rows/2)``; return its right."""
    rows, cols = m.shape
    top = rows / 2
    limit = float(m.abs().max()) or 1.0
    ax.imshow(
        m.numpy(),
        extent=(left, left + cols, top - rows, top),
        cmap="RdBu_r",
        vmin=-limit,
        vmax=limit,
        interpolation="nearest",
    )
    ax.add_patch(Rectangle((left, top - rows), cols, rows, fill=False, lw=0.8, ec="0.3"))
    ax.text(left + cols / 2, top - rows - 0.5, label, ha="center", va="top", fontsize=8)
    return left + cols


def _outline(ax: Axes, left: float, m_shape: tuple[int, int], rows: slice, cols: slice, color: str):
    """Outline the block ``[rows, cols]`` of a matrix drawn at ``left`` in ``color``."""
    n_rows, n_cols = m_shape
    r0, r1, _ = rows.indices(n_rows)
    c0, c1, _ = cols.indices(n_cols)
    top = n_rows / 2
    ax.add_patch(
        Rectangle(
            (left + c0 + 0.08, top - r1 + 0.08), c1 - c0 - 0.16, r1 - r0 - 0.16,
            fill=False, lw=2.5, ec=color,
        )
    )  # fmt: skip


def _symbol(ax: Axes, x: float, text: str) -> float:
    ax.text(x + 0.6, 0, text, ha="center", va="center", fontsize=16)
    return x + 1.2


def _blocks(size: int, parts: int) -> list[slice]:
    bounds = np.linspace(0, size, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def plot_matmul_split(x: torch.Tensor, w: torch.Tensor, parts: int = 2) -> Figure:
    """``Y = X W`` computed by ``parts`` ranks in two ways (coloured outlines: each rank's share).

    Top, split W by **columns**: every rank needs all of X and computes its own columns of Y;
    putting Y together is a concatenation. Bottom, split W by **rows**: rank r needs only the
    matching columns of X and computes a full-size *partial* product; Y is their **sum** (the
    all-reduce).
    """
    x, w = x.detach().float(), w.detach().float()
    y = x @ w
    n, k = x.shape
    m = w.shape[1]
    col_blocks, row_blocks = _blocks(m, parts), _blocks(k, parts)
    all_ = slice(None)
    fig, axes = new_figure(nrows=2, width=10.0, height=2.9)

    ax = axes[0]
    left = _matrix(ax, x, 0, "X (all of it, on every rank)")
    left = _symbol(ax, left, "×")
    w_left = left
    left = _matrix(ax, w, left, "W, split by columns")
    left = _symbol(ax, left, "=")
    y_left = left
    _matrix(ax, y, left, "Y = [" + " | ".join(f"X W{_sub(r)}" for r in range(parts)) + "]")
    for r, cols in enumerate(col_blocks):
        _outline(ax, w_left, (k, m), all_, cols, RANK_COLORS[r % len(RANK_COLORS)])
        _outline(ax, y_left, (n, m), all_, cols, RANK_COLORS[r % len(RANK_COLORS)])
    ax.set_title(
        "Column split: each rank computes its own output columns (outline colour: rank)",
        fontsize=10,
    )

    ax = axes[1]
    x_left = 0
    left = _matrix(ax, x, 0, "X, split by columns")
    left = _symbol(ax, left, "×")
    w_left = left
    left = _matrix(ax, w, left, "W, split by rows")
    left = _symbol(ax, left, "=")
    for r, block in enumerate(row_blocks):  # columns of X and rows of W: the same k-split
        _outline(ax, x_left, (n, k), all_, block, RANK_COLORS[r % len(RANK_COLORS)])
        _outline(ax, w_left, (k, m), block, all_, RANK_COLORS[r % len(RANK_COLORS)])
        partial = x[:, block] @ w[block, :]
        p_left = left
        left = _matrix(ax, partial, left, f"X{_sub(r)} W{_sub(r)} (rank {r})")
        _outline(ax, p_left, (n, m), all_, all_, RANK_COLORS[r % len(RANK_COLORS)])
        left = _symbol(ax, left, "+" if r < parts - 1 else "=")
    _matrix(ax, y, left, "Y: the sum (all-reduce)")
    ax.set_title("Row split: each rank computes a partial product; the sum is Y", fontsize=10)

    for ax in axes:
        ax.set_xlim(-0.5, ax.get_xlim()[1] + 0.5)
        ax.set_ylim(-max(n, k) / 2 - 1.6, max(n, k) / 2 + 0.3)
        ax.set_aspect("equal")
        ax.axis("off")
    return fig


def _sub(i: int) -> str:
    return "".join("₀₁₂₃₄₅₆₇₈₉"[int(c)] for c in str(i))


# ---------------------------------------------------------------------------------------------
# Megatron's MLP: where f and g go
# ---------------------------------------------------------------------------------------------


def _box(ax: Axes, x: float, y: float, text: str, color: str = "0.9", width: float = 1.5) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - 0.28), width, 0.56,
            boxstyle="round,pad=0.05", fc=color, ec="0.3", lw=1,
        )
    )  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "0.3"})


def plot_tp_mlp_diagram() -> Figure:
    """Megatron's MLP on two ranks: ``f``, column-parallel fc, GELU, row-parallel proj, ``g``.

    ``f`` is the identity going forward and an all-reduce of the input's gradient going backward;
    ``g`` is an all-reduce of the partial outputs going forward and the identity backward. Between
    them the ranks never talk: the column split of fc hands each rank exactly the slice of hidden
    units that its rows of proj need.
    """
    fig, ax = new_figure(width=10.0, height=2.8)
    lanes = {0: 0.75, 1: -0.75}
    _box(ax, 0.0, 0.0, "x\n(replicated)", width=1.2)
    _box(ax, 10.6, 0.0, "y\n(replicated)", width=1.2)
    _box(ax, 9.0, 0.0, "g\nall-reduce (sum)", color="#f4c7c3", width=1.7)
    for rank, lane in lanes.items():
        color = ("#c6dbef", "#fdd0a2")[rank]
        side = 1 if lane > 0 else -1  # rank 0's label above its lane, rank 1's below
        _box(ax, 1.8, lane, "f", color="#f4c7c3", width=0.7)
        _box(ax, 3.6, lane, f"x A{_sub(rank)}\nfc columns {rank}", color=color, width=1.9)
        _box(ax, 5.4, lane, "GELU", color=color, width=1.0)
        _box(
            ax, 7.1, lane, f"h{_sub(rank)} B{_sub(rank)}\nproj rows {rank}", color=color, width=1.9
        )
        _arrow(ax, (0.6, 0.0), (1.45, lane))
        _arrow(ax, (2.15, lane), (2.65, lane))
        _arrow(ax, (4.55, lane), (4.9, lane))
        _arrow(ax, (5.9, lane), (6.15, lane))
        _arrow(ax, (8.05, lane), (8.3, 0.2 * side))
        ax.text(5.4, lane + 0.45 * side, f"rank {rank}", ha="center", va="center", fontsize=9)
    _arrow(ax, (9.85, 0.0), (10.0, 0.0))
    ax.text(
        5.3,
        -1.85,
        "f: forward identity, backward all-reduce of ∂L/∂x      "
        "g: forward all-reduce of the partial outputs, backward identity",
        ha="center",
        fontsize=8.5,
    )
    ax.set_xlim(-0.7, 11.3)
    ax.set_ylim(-2.05, 1.45)
    ax.axis("off")
    ax.set_title("Tensor-parallel MLP: one all-reduce forward (g), one backward (f)", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# A tp run
# ---------------------------------------------------------------------------------------------


def plot_tp_breakdown(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Left: each rank's step time per step, stacked (compute, all-reduce, the rest).
    Right: bytes each rank sent per step, measured (bars) and by formula (black ticks).

    ``table`` is ``labkit.lessons.parallelism.tp_breakdown``'s result.
    """
    fig, (ax_time, ax_bytes) = new_figure(ncols=2, width=5.2, height=3.0)
    labels = [f"rank {r}\nstep {s}" for r, s in zip(table["rank"], table["step"])]
    y = np.arange(len(table))[::-1]
    left = np.zeros(len(table))
    for column, label, color in (
        ("compute_ms", "compute", "C0"),
        ("comm_ms", "all-reduce", "C3"),
        ("other_ms", "other", "C7"),
    ):
        values = table[column].to_numpy()
        ax_time.barh(y, values, left=left, color=color, label=label, height=0.7)
        left += values
    ax_time.set_yticks(y, labels, fontsize=7)
    ax_time.set_xlim(0, 1.4 * left.max())  # room for the legend on the right
    ax_time.set_xlabel("ms")
    ax_time.set_title("Step time per rank", fontsize=10)
    ax_time.legend(fontsize=8, loc="lower right")

    per_rank = table.groupby("rank")[["comm_bytes", "formula_bytes"]].median()
    x = np.arange(len(per_rank))
    ax_bytes.bar(x, per_rank["comm_bytes"] / MB, color="C3", width=0.5, label="measured")
    ax_bytes.plot(
        x, per_rank["formula_bytes"] / MB, "_", color="black", ms=40, mew=2, label="formula"
    )
    ax_bytes.set_xticks(x, [f"rank {r}" for r in per_rank.index])
    ax_bytes.set_ylabel("MB sent per step")
    ax_bytes.set_ylim(0, 1.3 * float(per_rank.to_numpy().max()) / MB)  # room for the legend
    ax_bytes.set_title("Bytes each rank sends per step", fontsize=10)
    ax_bytes.legend(fontsize=8, loc="upper right", ncols=2)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# Strategies side by side
# ---------------------------------------------------------------------------------------------


def _stacked_memory(ax: Axes, frame: pd.DataFrame, x: np.ndarray, scale: float) -> None:
    bottom = np.zeros(len(frame))
    for column, label, color in PARTS:
        values = frame[column].to_numpy() / scale
        ax.bar(x, values, bottom=bottom, color=color, label=label, width=0.7)
        bottom += values


def plot_strategies(
    measured: pd.DataFrame, formula: pd.DataFrame | None = None, title: str | None = None
) -> Figure:
    """Measured memory per rank (stacked: parameters, gradients, optimizer state) and bytes sent
    per step per rank, for each strategy and rank; ``formula`` (``plan``'s result) as black ticks.

    ``measured`` is ``labkit.lessons.parallelism.measure_strategies``'s result.
    """
    frame = measured.reset_index(drop=True)
    if formula is not None:
        frame = frame.merge(
            formula[["strategy", "rank", "total_bytes", "comm_bytes"]],
            on=["strategy", "rank"],
            how="left",
            suffixes=("", "_formula"),
        )
    fig, (ax_mem, ax_comm) = new_figure(ncols=2, width=5.6, height=3.4)
    # A gap between strategies: ranks of one strategy sit together, named once below them.
    group = frame["strategy"].ne(frame["strategy"].shift()).cumsum().to_numpy()
    x = np.arange(len(frame)) + 0.6 * (group - 1)
    labels = [f"r{r}" for r in frame["rank"]]

    _stacked_memory(ax_mem, frame, x, MIB)
    measured = frame["wire_bytes"] if "wire_bytes" in frame else frame["comm_bytes"]
    ax_comm.bar(x, measured / MB, color="C3", width=0.7, label="measured messages (ring)")
    if formula is not None:
        kwargs = dict(color="black", ms=14, mew=2, linestyle="none")
        ax_mem.plot(x, frame["total_bytes_formula"] / MIB, "_", label="formula", **kwargs)
        ax_comm.plot(x, frame["comm_bytes_formula"] / MB, "_", label="formula (sent)", **kwargs)
    for ax in (ax_mem, ax_comm):
        ax.set_xticks(x, labels, fontsize=7)
        for strategy, where in pd.Series(x).groupby(frame["strategy"].to_numpy(), sort=False):
            ax.text(
                where.mean(), -0.08, STRATEGY_LABELS.get(strategy, strategy),
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8,
            )  # fmt: skip
    ax_mem.set_ylabel("MiB per rank")
    ax_mem.set_title("Memory per rank (model states)", fontsize=10)
    ax_mem.legend(fontsize=7, loc="upper right")
    ax_comm.set_ylabel("MB per step")
    ax_comm.set_title("Bytes each rank sends per step", fontsize=10)
    ax_comm.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_plan(frame: pd.DataFrame, title: str | None = None) -> Figure:
    """The formulas (``plan``'s result): for each strategy, the memory of its fullest rank
    (stacked) and the most bytes any of its ranks sends per step."""
    top = busiest_rank(frame)
    fig, (ax_mem, ax_comm) = new_figure(ncols=2, width=5.0, height=3.2)
    x = np.arange(len(top))
    labels = [STRATEGY_LABELS.get(s, s) for s in top["strategy"]]
    scale = MIB if top["total_bytes"].max() < 2**30 else 2**30
    _stacked_memory(ax_mem, top, x, scale)
    ax_mem.set_ylabel("MiB per rank" if scale == MIB else "GiB per rank")
    ax_mem.set_title("Memory of the fullest rank", fontsize=10)
    ax_mem.legend(fontsize=7)
    ax_comm.bar(x, top["comm_bytes"] / MB, color="C3", width=0.6)
    ax_comm.set_ylabel("MB per step")
    ax_comm.set_title("Most bytes a rank sends per step", fontsize=10)
    for ax in (ax_mem, ax_comm):
        ax.set_xticks(x, labels, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_context_parallel(runs: pd.DataFrame) -> Figure:
    """``lessons.context_parallel.train_with_cp``'s table: measured activations per rank beside
    ``one process / cp``, and ring attention's measured bytes per step beside its formula."""
    fig, (ax_mem, ax_kv) = new_figure(ncols=2, width=5.0)
    sizes = runs.index.astype(str)
    tick = {"color": "k", "marker": "_", "markersize": 30, "linestyle": "none"}
    ax_mem.bar(sizes, runs["activations_KiB"], color="C0", label="measured (saved for backward)")
    ax_mem.plot(
        sizes, runs["activations_KiB"].iloc[0] / runs.index, label="one process / cp", **tick
    )
    ax_mem.set(xlabel="cp", ylabel="KiB per rank", title="activations a rank keeps")
    ax_kv.bar(sizes, runs["kv_sent_KiB"], color="C1", label="measured (sent)")
    ax_kv.plot(sizes, runs["kv_formula_KiB"], label="formula: 6W - 4 blocks", **tick)
    ax_kv.set(xlabel="cp", ylabel="KiB per rank and step", title="ring attention's traffic")
    for ax in (ax_mem, ax_kv):
        ax.legend(fontsize=8)
    return fig
