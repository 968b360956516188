"""The schedule explorer of notebook 04: any schedule, p, m and v, on paper at once and for real.

Moving a control redraws the *simulated* timeline (``labkit.lessons.pipeline.simulate_schedule``,
milliseconds); "Run on 2 processes" trains the same schedule with ``pp = 2`` and the chosen m
and v through ``labkit.run`` and draws the measured last step
(its own figure: milliseconds against simulated units). Each title gives the bubble beside
the schedule's formula.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

import labkit
from labkit.lessons.pipeline import PIPELINE, measured_vs_formula, simulate_schedule
from labkit.parallel.pp_orders import bubble_formula
from labkit.plots.pipeline import plot_gantts
from labkit.result import RunResult
from labkit.widgets.common import Panel, show_figure

__all__ = ["SCHEDULE_CHOICES", "SchedulePanel"]

# Dropdown label -> pp_schedule.
SCHEDULE_CHOICES = (
    ("GPipe", "gpipe"),
    ("1F1B", "1f1b"),
    ("interleaved 1F1B", "interleaved-1f1b"),
    ("ZB-H1", "zb-h1"),
)


class SchedulePanel(Panel):
    """Schedule, stages p, micro-batches m and chunks v; the simulated Gantt chart follows them.

    ``update()`` redraws the simulation (controls call it); ``run()`` (the button) trains on two
    processes. Afterwards ``figure`` is the figure, ``message`` a one-line summary or the error,
    ``result`` the last real run (None until one succeeds). Extra keyword arguments go to
    ``labkit.run`` (they override ``PIPELINE``).
    """

    def __init__(
        self, schedule: str = "zb-h1", stages: int = 4, micro_batches: int = 8, **run_kwargs: Any
    ) -> None:
        self.run_kwargs = {**PIPELINE, "world_size": 2, "threads": 2, **run_kwargs}
        self.schedule = widgets.Dropdown(
            options=SCHEDULE_CHOICES, value=schedule, description="schedule"
        )
        self.stages = widgets.IntSlider(value=stages, min=2, max=8, description="p")
        self.micro_batches = widgets.IntSlider(value=micro_batches, min=1, max=16, description="m")
        self.chunks = widgets.IntSlider(value=2, min=2, max=4, description="v")
        self.button = widgets.Button(description="Run on 2 processes", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.figure: Figure | None = None
        self.result: RunResult | None = None
        self.message = ""
        for control in (self.schedule, self.stages, self.micro_batches, self.chunks):
            control.observe(lambda _: self.update(), names="value")
        self.button.on_click(lambda _: self.run())
        controls = widgets.HBox([self.schedule, self.stages, self.micro_batches, self.chunks])
        self.widget = widgets.VBox([controls, self.button, self.status, self.output])

    def _v(self) -> int:
        return int(self.chunks.value) if self.schedule.value == "interleaved-1f1b" else 1

    def _label(self, p: int) -> str:
        name = dict((v, k) for k, v in SCHEDULE_CHOICES)[self.schedule.value]
        v = f", v={self._v()}" if self._v() > 1 else ""
        return f"{name}, p={p}, m={self.micro_batches.value}{v}"

    def _simulated(self, p: int) -> tuple[str, Any, float]:
        m, v, name = int(self.micro_batches.value), self._v(), self.schedule.value
        label = f"simulated: {self._label(p)}"
        return label, simulate_schedule(name, m, p, n_chunks=v), bubble_formula(name, m, p, v)

    def update(self) -> None:
        """Redraw the simulated timeline for the current controls; a bad choice gives a message."""
        self.chunks.disabled = self.schedule.value != "interleaved-1f1b"
        try:
            label, timeline, formula = self._simulated(int(self.stages.value))
        except ValueError as err:
            self._set_message(f"Not simulated: {err}", error=True)
            return
        self._set_message(f"{self._label(int(self.stages.value))}: formula bubble {formula:.3f}")
        self.figure = plot_gantts({label: timeline}, formulas={label: formula})
        show_figure(self.output, self.figure)

    def run(self) -> None:
        """Train the chosen schedule on 2 processes and draw its measured last step."""
        name, v = self.schedule.value, self._v()
        settings = dict(
            self.run_kwargs,
            strategy="mesh",
            pp=2,
            pp_schedule=name,
            micro_batches=int(self.micro_batches.value),
            pp_virtual_stages=v,
        )
        self.button.disabled = True
        self._set_message(f"Running {self._label(2)} ...")
        try:
            _, _, formula = self._simulated(2)
            result = labkit.run(**settings, progress=False)
        except (ValueError, labkit.WorkerError) as err:
            self._set_message(f"Not run: {err}", error=True)
            return
        finally:
            self.button.disabled = False
        self.result = result
        label = f"measured: {self._label(2)}"
        row = measured_vs_formula({label: result}, result).iloc[0]
        self._set_message(
            f"{self._label(2)}: bubble {row.measured:.3f} measured, {row.formula:.3f} by the "
            f"formula with the measured F/B/W times ({formula:.3f} with F=1, B=2 on paper), "
            f"median step {row.step_ms:.0f} ms"
        )
        # Its own figure: measured milliseconds and simulated units share no time axis.
        self.figure = plot_gantts({label: result}, formulas={label: row.formula})
        show_figure(self.output, self.figure)
