"""A loss plot that redraws while the model trains, for notebooks.

``train_live(model="nano", steps=80, ...)`` trains in this process through the one training loop
(``labkit.train.Trainer.fit``) and, every ``every`` steps, redraws a figure of the loss and the
learning rate so far. It returns the same ``RunResult`` as ``labkit.run``.

How the redraw works without widgets: ``IPython.display.display(fig, display_id=True)`` returns a
handle whose ``update(fig)`` replaces that very output with a fresh picture of the figure. The
executed notebook keeps the last picture, so it also reads well on GitHub.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.figure import Figure

from labkit.config import TrainConfig, make_config
from labkit.launch import run_single
from labkit.plots.common import new_figure
from labkit.plots.training import draw_loss, draw_lr
from labkit.result import RunResult

__all__ = ["LiveLossPlot", "train_live"]


class LiveLossPlot:
    """A two-panel figure (loss, learning rate) that is redrawn from the metric rows so far.

    ``update(rows)`` redraws from a list of metric dicts (``Trainer.metrics``) and pushes the new
    picture to the notebook output (when ``show=True``). ``close()`` frees the figure in pyplot so
    that the inline backend does not draw it a second time at the end of the cell.
    """

    def __init__(self, total_steps: int, title: str = "", show: bool = True) -> None:
        self.total_steps = total_steps
        self.title = title
        self.show = show
        self.figure: Figure
        self.figure, (self.ax_loss, self.ax_lr) = new_figure(ncols=2, width=5.5)
        self.updates = 0
        self._handle = None
        self._draw([])
        if show:
            self._handle = display(self.figure, display_id=True)

    def _draw(self, rows: list[dict[str, Any]]) -> None:
        for ax in (self.ax_loss, self.ax_lr):
            ax.clear()
        runs = {"": rows} if rows else {}
        draw_loss(self.ax_loss, runs)
        draw_lr(self.ax_lr, runs)
        # A fixed x range: the curve grows from left to right instead of the axis stretching.
        for ax in (self.ax_loss, self.ax_lr):
            ax.set_xlim(-1, max(1, self.total_steps))
        handles, labels = self.ax_loss.get_legend_handles_labels()
        if handles:
            self.ax_loss.legend(handles, [lab.removeprefix(": ") for lab in labels], fontsize=8)
        done = len(rows)
        self.figure.suptitle(f"{self.title}  (step {done} of {self.total_steps})".strip())

    def update(self, rows: list[dict[str, Any]]) -> None:
        """Redraw from the metric rows so far and refresh the notebook output."""
        self._draw(rows)
        self.updates += 1
        if self._handle is not None:
            self._handle.update(self.figure)

    def close(self) -> None:
        """Free the figure in pyplot (``self.figure`` stays usable)."""
        plt.close(self.figure)


def train_live(
    config: TrainConfig | None = None, *, every: int = 10, show: bool = True, **overrides: Any
) -> RunResult:
    """Train a single-process run, redrawing the loss and LR every ``every`` steps.

    Takes the same arguments as ``labkit.run`` (a config and/or TrainConfig fields); only
    ``strategy="single"`` is supported, because the figure lives in this process. The progress
    bar is the usual one (``progress=False`` hides it).
    """
    cfg = make_config(config, **overrides)
    if cfg.strategy != "single":
        raise ValueError(
            f"TrainConfig.strategy={cfg.strategy!r} is invalid here: train_live draws in this "
            "process, so it trains strategy='single'; use labkit.run for multi-process runs"
        )
    if every < 1:
        raise ValueError(f"every={every!r} is invalid: redraw every 1 or more steps")
    end = cfg.stop_after or cfg.steps
    plot = LiveLossPlot(end, title=f"{cfg.model}, lr={cfg.lr:g}, {cfg.schedule}", show=show)

    # The loop appends the step's metrics row (with val_loss at eval steps) before calling
    # on_step, so the plot always sees the complete row.
    def redraw(step: int, metrics: list[dict[str, Any]]) -> None:
        if step % every == 0 or step == end:
            plot.update(metrics)

    try:
        result = run_single(cfg, on_step=redraw)
    finally:
        plot.close()
    result.info["live_updates"] = plot.updates  # how many times the figure was redrawn
    return result
