"""The schedule designer of notebook 02: pick a schedule, a warm-up, a peak and a floor, and see
the learning rate of every optimizer step; "Add to comparison" keeps a curve to overlay others.

Computing a curve is cheap (a few thousand calls of a pure function), so the sliders redraw live.
The curve comes from ``labkit.schedules.get_schedule(...).curve()``, the very schedule the training
loop uses, so what the panel draws is what a run with those settings gets.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from labkit.plots.schedules import plot_lr_curves
from labkit.schedules import SCHEDULES, WARMUPS, Schedule, get_schedule
from labkit.widgets.common import Panel, show_figure

__all__ = ["ScheduleDesigner", "describe_schedule"]

MAX_COMPARISON = 8  # more overlaid curves than this are unreadable


def describe_schedule(schedule: Schedule) -> str:
    """A short legend label: name, warm-up, peak and floor, e.g. ``cosine, warm-up 20 (linear)``."""
    if schedule.warmup.startswith("untuned"):
        warm = f"{schedule.warmup} ({schedule.warmup_length:g} steps, beta2={schedule.beta2})"
    elif schedule.warmup_steps:
        warm = f"warm-up {schedule.warmup_steps} ({schedule.warmup})"
    else:
        warm = "no warm-up"
    floor = f", floor {schedule.min_lr:.2g}" if schedule.min_lr else ""
    return f"{schedule.name}, {warm}, peak {schedule.peak_lr:.2g}{floor}"


class ScheduleDesigner(Panel):
    """Dropdowns (schedule, warm-up kind) and sliders (run length, warm-up length, peak, floor,
    beta2) above a live plot of the LR curve, with buttons to keep curves for comparison.

    ``update()`` rebuilds the schedule from the controls and redraws; every control calls it on
    change. After it, ``schedule`` holds the current Schedule (None if the settings were
    rejected), ``curve`` its LRs, ``figure`` the figure and ``message`` a summary or the
    ValueError's text: invalid combinations are reported in the panel, never raised.
    ``comparison`` maps labels to the kept schedules.
    """

    def __init__(
        self,
        schedule: str = "cosine",
        warmup: str = "linear",
        *,
        total_steps: int = 200,
        warmup_steps: int = 20,
        peak_lr: float = 3e-3,
        min_lr: float = 0.0,
        beta2: float = 0.95,
    ) -> None:
        self.name = widgets.Dropdown(options=SCHEDULES, value=schedule, description="schedule")
        self.warmup = widgets.Dropdown(options=WARMUPS, value=warmup, description="warm-up")
        self.total_steps = widgets.IntSlider(
            value=total_steps, min=10, max=5000, step=10, description="steps"
        )
        self.warmup_steps = widgets.IntSlider(
            value=warmup_steps, min=0, max=5000, step=1, description="warm-up steps"
        )
        self.peak_lr = widgets.FloatLogSlider(
            value=peak_lr,
            base=10,
            min=-5,
            max=0,
            step=0.1,
            description="peak",
            readout_format=".2g",
        )
        # A linear slider: the floor must be able to be exactly 0 (a log slider cannot).
        self.min_lr = widgets.FloatSlider(
            value=min_lr, min=0.0, max=1e-2, step=1e-4, description="floor", readout_format=".1e"
        )
        self.beta2 = widgets.Dropdown(
            options=(0.9, 0.95, 0.98, 0.99, 0.995, 0.999), value=beta2, description="Adam beta2"
        )
        self.add_button = widgets.Button(description="Add to comparison", icon="plus")
        self.clear_button = widgets.Button(description="Clear comparison", icon="trash")
        self.status = widgets.HTML()
        self.output = widgets.Output()

        self.schedule: Schedule | None = None
        self.curve: list[float] = []
        self.figure: Figure | None = None
        self.message = ""
        self.comparison: dict[str, Schedule] = {}

        self.warmup.observe(self._on_warmup, names="value")
        for control in self.controls:
            control.observe(lambda _: self.update(), names="value")
        self.add_button.on_click(lambda _: self.add_to_comparison())
        self.clear_button.on_click(lambda _: self.clear_comparison())
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.name, self.warmup, self.beta2]),
                widgets.HBox([self.total_steps, self.warmup_steps]),
                widgets.HBox([self.peak_lr, self.min_lr]),
                widgets.HBox([self.add_button, self.clear_button]),
                self.status,
                self.output,
            ]
        )

    @property
    def controls(self) -> list[widgets.ValueWidget]:
        """Every control whose value shapes the schedule."""
        return [
            self.name,
            self.warmup,
            self.total_steps,
            self.warmup_steps,
            self.peak_lr,
            self.min_lr,
            self.beta2,
        ]

    def _on_warmup(self, change: dict[str, Any]) -> None:
        # The untuned warm-ups take their length from beta2 and reject warmup_steps > 0: move the
        # slider to 0 so choosing one shows a curve rather than an error. (Moving the slider
        # back up afterwards shows the error message, which is also instructive.)
        if str(change["new"]).startswith("untuned"):
            self.warmup_steps.value = 0

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of ``get_schedule`` for the current control values."""
        return {
            "name": self.name.value,
            "peak_lr": float(self.peak_lr.value),
            "total_steps": int(self.total_steps.value),
            "warmup_steps": int(self.warmup_steps.value),
            "warmup": self.warmup.value,
            "min_lr": float(self.min_lr.value),
            "beta2": float(self.beta2.value),
        }

    # ------------------------------------------------------------------ compute and draw
    def update(self) -> None:
        """Rebuild the schedule from the controls and redraw; never raises on a bad combination."""
        try:
            schedule = get_schedule(**self.settings())
        except ValueError as err:  # e.g. warm-up longer than the run, floor above the peak
            self.schedule, self.curve = None, []
            self._set_message(f"Not a valid schedule: {err}", error=True)
            self._redraw()
            return
        self.schedule, self.curve = schedule, schedule.curve()
        self._set_message(
            f"{describe_schedule(schedule)}: LR {self.curve[0]:.3g} at step 0, "
            f"max {max(self.curve):.3g}, {self.curve[-1]:.3g} at the last step."
        )
        self._redraw()

    def add_to_comparison(self) -> None:
        """Keep the current schedule on the plot (the oldest goes when there are too many)."""
        if self.schedule is None:
            return
        label = describe_schedule(self.schedule)
        if label in self.comparison:  # same label, different run length: keep them apart
            label = f"{label}, {self.schedule.total_steps} steps"
        self.comparison[label] = self.schedule
        while len(self.comparison) > MAX_COMPARISON:
            self.comparison.pop(next(iter(self.comparison)))
        self._redraw()

    def clear_comparison(self) -> None:
        """Forget the kept schedules."""
        self.comparison.clear()
        self._redraw()

    def _redraw(self) -> None:
        curves: dict[str, Schedule] = dict(self.comparison)
        current = None
        if self.schedule is not None:
            current = "current: " + describe_schedule(self.schedule)
            curves[current] = self.schedule
        figure = plot_lr_curves(curves, highlight=current)
        if self.schedule is None:
            figure.axes[0].set_title("No valid schedule: see the message above")
        old, self.figure = self.figure, figure
        if old is not None:
            plt.close(old)  # many slider moves must not pile up figures in pyplot
        show_figure(self.output, figure)
