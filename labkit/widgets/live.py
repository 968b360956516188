"""A loss plot that redraws while the model trains, for notebooks.

``train_live(model="nano", steps=80, ...)`` trains in this process through the one training loop
(``labkit.train.Trainer.fit``) and, every ``every`` steps, redraws a figure of the loss and the
learning rate so far. It returns the same ``RunResult`` as ``labkit.run``.

How the redraw works without widgets: ``IPython.display.display(fig, display_id=True)`` returns a
handle whose ``update(fig)`` replaces that very output with a fresh picture of the figure. The
executed notebook keeps the last picture, so it also reads well on GitHub.
"""

from __future__ import annotations

import time
from typing import Any

import matplotlib.pyplot as plt
import torch
from IPython.display import display
from matplotlib.figure import Figure

from labkit.config import TrainConfig, make_config
from labkit.launch import resolve_device
from labkit.parallel.base import DistContext
from labkit.plots.common import new_figure
from labkit.plots.training import draw_loss, draw_lr
from labkit.result import RunResult
from labkit.train import Trainer

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
    from tqdm.auto import tqdm

    cfg = make_config(config, **overrides)
    if cfg.strategy != "single":
        raise ValueError(
            f"TrainConfig.strategy={cfg.strategy!r} is invalid here: train_live draws in this "
            "process, so it trains strategy='single'; use labkit.run for multi-process runs"
        )
    if every < 1:
        raise ValueError(f"every={every!r} is invalid: redraw every 1 or more steps")
    device_type, _ = resolve_device(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    end = cfg.stop_after or cfg.steps
    t_start = time.perf_counter()
    plot = LiveLossPlot(end, title=f"{cfg.model}, lr={cfg.lr:g}, {cfg.schedule}", show=show)
    bar = tqdm(total=end, desc="training", disable=not cfg.progress, leave=False)
    try:
        trainer = Trainer(cfg, DistContext(device=torch.device(device_type)))

        # Trainer.fit appends the step's metrics row (with val_loss at eval steps) and only then
        # calls on_step, so the plot always sees the complete row.
        def on_step(step: int) -> None:
            bar.update(1)
            if step % every == 0 or step == end:
                plot.update(trainer.metrics)

        out = trainer.fit(on_step=on_step)
    finally:
        bar.close()
        plot.close()
        torch.set_num_threads(previous_threads)
    info = dict(out.info, backend=None, world_size=1)
    payload = {
        "metrics": out.metrics,
        "timeline": out.timeline,
        "layer_norms": out.layer_norms,
        "state": out.state,
    }
    result = RunResult.from_ranks(cfg, payload, info)
    result.info["live_updates"] = plot.updates  # how many times the figure was redrawn
    result.info["wall_s"] = time.perf_counter() - t_start
    return result
