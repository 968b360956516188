"""The pipeline panel of notebook 04: choose a schedule and a number of micro-batches, press Run,
and see the measured Gantt chart of the last step on both stages, with the bubble measured
against the theory ``(p - 1) / (m + p - 1)``, next to every try so far.

Every press is a real two-process pipeline run through ``labkit.run``, so it takes a few seconds
(starting the processes is most of it): it runs when Run is pressed, never while the slider moves.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

import labkit
from labkit.lessons.pipeline import PIPELINE
from labkit.lessons.pipeline_timeline import bubble_fraction, peak_activations
from labkit.plots.pipeline import plot_pipeline_try
from labkit.result import RunResult
from labkit.widgets.common import Panel, show_figure

__all__ = ["SCHEDULE_OPTIONS", "TRY_COLUMNS", "PipelinePanel"]

# Dropdown label -> value. Naive model parallelism is the pipeline with one micro-batch.
SCHEDULE_OPTIONS = (
    ("naive (one micro-batch)", "naive"),
    ("GPipe", "pp-gpipe"),
    ("1F1B", "pp-1f1b"),
)
TRY_COLUMNS = ("schedule", "micro_batches", "bubble", "theory", "step_ms", "peak")


class PipelinePanel(Panel):
    """A schedule dropdown, a micro-batch slider and a Run button above the try's figure.

    ``update()`` trains a short pipeline run on two processes with the current settings and
    redraws; the Run button calls it. Afterwards ``result`` is the last RunResult (None if the
    settings were rejected or the run failed), ``tries`` a DataFrame with one row per try
    (``TRY_COLUMNS``), ``figure`` the figure and ``message`` a one-line summary or the error.
    Extra keyword arguments go to ``labkit.run`` (they override ``PIPELINE``).
    """

    def __init__(
        self,
        schedule: str = "pp-1f1b",
        micro_batches: int = 4,
        *,
        world_size: int = 2,
        **run_kwargs: Any,
    ) -> None:
        self.run_kwargs: dict[str, Any] = {
            **PIPELINE,
            "world_size": world_size,
            "threads": world_size,  # one thread per rank: the ranks share the cores
            **run_kwargs,
        }
        self.schedule = widgets.Dropdown(
            options=SCHEDULE_OPTIONS, value=schedule, description="schedule"
        )
        self.micro_batches = widgets.IntSlider(
            value=micro_batches,
            min=1,
            max=8,
            description="micro-batches",
            continuous_update=False,  # nothing runs until Run is pressed; no redraw per pixel
            style={"description_width": "initial"},
        )
        self.button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.result: RunResult | None = None
        self.figure: Figure | None = None
        self.message = ""
        self._tries: list[dict[str, Any]] = []
        self.schedule.observe(lambda _: self._sync_slider(), names="value")
        self.button.on_click(lambda _: self.update())
        self._sync_slider()
        controls = widgets.HBox([self.schedule, self.micro_batches, self.button])
        self.widget = widgets.VBox([controls, self.status, self.output])

    # ------------------------------------------------------------------ controls
    def _sync_slider(self) -> None:
        """Naive model parallelism has exactly one micro-batch: pin the slider there."""
        naive = self.schedule.value == "naive"
        self.micro_batches.disabled = naive
        if naive:
            self.micro_batches.value = 1

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of ``labkit.run`` for the current control values."""
        naive = self.schedule.value == "naive"
        return dict(
            self.run_kwargs,
            strategy="pp-gpipe" if naive else self.schedule.value,
            micro_batches=1 if naive else int(self.micro_batches.value),
        )

    # ------------------------------------------------------------------ run and draw
    def update(self) -> None:
        """Run one short pipeline training with the current settings and redraw.

        A rejected setting (say, micro-batches that do not divide the batch) or a failed run
        shows a message and keeps the previous figure; it never raises.
        """
        settings = self.settings()
        label = dict((v, k) for k, v in SCHEDULE_OPTIONS)[self.schedule.value]
        self.button.disabled = True  # one run at a time
        self._set_message(f"Running {label} with m={settings['micro_batches']} ...")
        try:
            result = labkit.run(**settings, progress=False)
        except (ValueError, labkit.WorkerError) as err:
            self.result = None
            self._set_message(f"Not run: {err}", error=True)
            return
        finally:
            self.button.disabled = False
        self.result = result
        row = self._try_row(result)
        self._tries.append(row)
        self._set_message(
            f"{label}, m={row['micro_batches']}: bubble {row['bubble']:.2f} measured, "
            f"{row['theory']:.2f} in theory; last step {row['step_ms']:.0f} ms; stage 0 held "
            f"at most {row['peak']} micro-batches' activations ({len(self._tries)} tries so far)."
        )
        cfg = result.config
        self.figure = plot_pipeline_try(
            result,
            self.tries,
            label=f"{label}, m={row['micro_batches']}",
            title=f"{cfg.model} GPT, {cfg.world_size} stages, {cfg.global_batch_size} sequences "
            f"per step: last step of try #{len(self._tries)}",
        )
        show_figure(self.output, self.figure)

    def _try_row(self, result: RunResult) -> dict[str, Any]:
        bubble = bubble_fraction(result.timeline)
        metrics = result.metrics
        last = metrics[metrics["step"] == metrics["step"].max()]
        return {
            "schedule": self.schedule.value,
            "micro_batches": result.config.micro_batches,
            "bubble": float(bubble["bubble"].mean()),
            "theory": float(bubble["theory"].iloc[0]),
            "step_ms": float(last["step_time_s"].max()) * 1e3,
            "peak": int(peak_activations(result.timeline).loc[0, "peak"]),
        }

    @property
    def tries(self) -> pd.DataFrame:
        """One row per try so far (``TRY_COLUMNS``): bubble is the mean over ranks."""
        return pd.DataFrame(self._tries, columns=list(TRY_COLUMNS))

    def clear(self) -> None:
        """Forget the earlier tries."""
        self._tries.clear()
