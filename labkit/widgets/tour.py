"""The example panel of notebook 00: how every panel of the lab works, on the smallest scale.

Set a learning rate, a schedule and a number of steps, press Train: a nano GPT trains through
``labkit.run`` and the figure shows its loss and learning rate next to the previous tries (the
last ``keep`` of them), so the effect of a knob is visible at a glance.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

import labkit
from labkit.lessons.tour import uniform_loss
from labkit.plots.common import new_figure
from labkit.plots.training import draw_loss, draw_lr
from labkit.result import RunResult
from labkit.widgets.common import Panel, show_figure

__all__ = ["TourPanel"]


class TourPanel(Panel):
    """Controls (lr, schedule, steps, Train) above a figure of the last few runs.

    ``update()`` trains once with the current values and redraws; the Train button calls it.
    Afterwards ``result`` is the RunResult (None if the settings were rejected), ``runs`` the last
    ``keep`` results by label, ``figure`` the figure and ``message`` a one-line summary or error.
    Extra keyword arguments go to ``labkit.run``.
    """

    def __init__(
        self,
        lr: float = 1e-2,
        schedule: str = "cosine",
        steps: int = 40,
        *,
        model: str = "nano",
        keep: int = 3,
        **run_kwargs: Any,
    ) -> None:
        self.run_kwargs: dict[str, Any] = {
            "model": model,
            "threads": 1,  # a tiny model runs fastest on one thread (and shares the CPU well)
            "timeline": False,
            **run_kwargs,
        }
        self.keep = keep
        # continuous_update=False: the value changes when the handle is released, not while it
        # moves. Here nothing runs until Train is pressed anyway; panels that redraw on a slider
        # change rely on it to train once per release rather than once per pixel.
        self.lr = widgets.FloatLogSlider(
            value=lr,
            base=10,
            min=-4,
            max=0,
            step=0.25,
            description="lr",
            readout_format=".2g",
            continuous_update=False,
        )
        self.schedule = widgets.Dropdown(
            options=["constant", "linear", "cosine"], value=schedule, description="schedule"
        )
        self.steps = widgets.IntSlider(
            value=steps, min=10, max=200, step=10, description="steps", continuous_update=False
        )
        self.button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.result: RunResult | None = None
        self.runs: dict[str, RunResult] = {}
        self.figure: Figure | None = None
        self.message = ""
        self.button.on_click(lambda _: self.update())
        controls = widgets.HBox([self.lr, self.schedule, self.steps, self.button])
        self.widget = widgets.VBox([controls, self.status, self.output])

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of ``labkit.run`` for the current control values."""
        steps = int(self.steps.value)
        return dict(
            self.run_kwargs,
            lr=float(self.lr.value),
            schedule=self.schedule.value,
            steps=steps,
            warmup_steps=steps // 10,  # a short warm-up, the safe default of the lab
        )

    def update(self) -> None:
        """Train with the current settings and redraw; a rejected setting gives a message."""
        settings = self.settings()
        self._set_message("Training...")
        try:
            result = labkit.run(**settings, progress=False)
        except ValueError as err:
            self.result = None
            self._set_message(f"Not trained: {err}", error=True)
            return
        self.result = result
        label = f"lr={settings['lr']:.2g}, {settings['schedule']}, {settings['steps']} steps"
        self.runs.pop(label, None)  # the same settings again: move to the newest place
        self.runs[label] = result
        while len(self.runs) > self.keep:
            self.runs.pop(next(iter(self.runs)))
        guess = uniform_loss(result.config.corpus)
        self._set_message(
            f"Final validation loss {result.final_val_loss:.3f} (guessing every character "
            f"equally likely gives {guess:.2f}); the figure keeps your last {self.keep} runs."
        )
        self._redraw()

    def _redraw(self) -> None:
        figure, (ax_loss, ax_lr) = new_figure(ncols=2, width=5.5)
        draw_loss(ax_loss, self.runs)
        draw_lr(ax_lr, self.runs)
        if self.figure is not None:
            plt.close(self.figure)  # the old figure is replaced: free it
        self.figure = figure
        show_figure(self.output, figure)
