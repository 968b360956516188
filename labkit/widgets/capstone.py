"""The capstone panel of notebook 07: reach a target validation loss in the least wall time.

Every knob of the lab is a control: strategy, world size, learning rate, schedule, warm-up,
clipping, batch size and steps. Press Run: the panel trains through ``labkit.run`` (real worker
processes for the data-parallel strategies), adds a row to the results table (settings, wall time,
final validation loss, target reached or not) and redraws the challenge board.
"""

from __future__ import annotations

import math
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

import labkit
from labkit.plots.capstone import plot_challenge, wall_breakdown
from labkit.plots.training import rank0
from labkit.result import RunResult
from labkit.widgets.common import Panel, show_figure, show_table

__all__ = ["RESULT_COLUMNS", "STRATEGIES", "CapstonePanel"]

# Strategies that train the whole model on every rank: any of them works for any model size here.
STRATEGIES = ("single", "dp-naive", "dp-bucketed", "ddp")
SCHEDULES = ("constant", "linear", "cosine", "wsd", "inverse_sqrt")
CLIPS = ("none", "norm", "autoclip", "zclip")
BATCHES = (4, 8, 16, 32, 64)
SHOW_CURVES = 6  # validation curves drawn on the board (the table keeps every try)

RESULT_COLUMNS = (
    "try",
    "strategy",
    "world_size",
    "lr",
    "schedule",
    "warmup_steps",
    "clip",
    "max_norm",
    "batch",
    "steps",
    "wall_s",
    "steps_s",
    "final_val_loss",
    "reached",
)


class CapstonePanel(Panel):
    """The challenge: knobs, a Run button, a results table that grows with every try, a figure.

    ``update()`` runs one try with the current control values (the Run button calls it). After
    it: ``result`` is the RunResult of the last try (None if rejected or failed), ``results`` the
    table of all tries (a DataFrame with ``RESULT_COLUMNS``), ``figure`` the challenge board and
    ``message`` a one-line summary or the reason nothing ran. Extra keyword arguments go to every
    ``labkit.run`` (for example ``eval_every``).
    """

    def __init__(
        self,
        target: float = 2.35,
        *,
        model: str = "nano",
        strategy: str = "single",
        world_size: int = 1,
        lr: float = 3e-3,
        schedule: str = "constant",
        warmup_steps: int = 0,
        clip: str = "norm",
        max_norm: float = 1.0,
        batch: int = 16,
        steps: int = 60,
        threads: int | None = 1,
        **run_kwargs: Any,
    ) -> None:
        self.target = float(target)
        # threads=1: the nano and micro models are too small to gain from several threads per
        # process, and on a laptop the ranks of a data-parallel run share the same few cores.
        self.run_kwargs: dict[str, Any] = {"model": model, "threads": threads, **run_kwargs}
        self.strategy = widgets.Dropdown(options=STRATEGIES, value=strategy, description="strategy")
        self.world_size = widgets.IntSlider(
            value=world_size, min=1, max=4, description="world size", continuous_update=False
        )
        self.lr = widgets.FloatLogSlider(
            value=lr,
            base=10,
            min=-4,
            max=0,
            step=0.1,
            description="lr",
            readout_format=".2g",
            continuous_update=False,
        )
        self.schedule = widgets.Dropdown(options=SCHEDULES, value=schedule, description="schedule")
        self.warmup = widgets.IntSlider(
            value=warmup_steps,
            min=0,
            max=200,
            step=2,
            description="warm-up",
            continuous_update=False,
        )
        self.clip = widgets.Dropdown(options=CLIPS, value=clip, description="clip")
        self.max_norm = widgets.FloatLogSlider(
            value=max_norm,
            base=10,
            min=-2,
            max=2,
            step=0.25,
            description="max_norm",
            readout_format=".2g",
            continuous_update=False,
        )
        self.batch = widgets.Dropdown(options=BATCHES, value=batch, description="batch")
        self.steps = widgets.IntSlider(
            value=steps, min=10, max=400, step=10, description="steps", continuous_update=False
        )
        self.button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.table = widgets.Output()

        self.result: RunResult | None = None
        self.results = pd.DataFrame(columns=list(RESULT_COLUMNS))
        self.curves: dict[str, pd.DataFrame] = {}
        self.figure: Figure | None = None
        self.message = ""

        self.strategy.observe(self._on_strategy, names="value")
        self.clip.observe(self._on_clip, names="value")
        self.button.on_click(lambda _: self.update())
        self._on_clip({"new": self.clip.value})
        header = widgets.HTML(
            f"<b>Challenge:</b> validation loss &le; {self.target:g} with model "
            f"<code>{model}</code> in the least wall time."
        )
        grid = widgets.GridBox(
            [
                self.strategy,
                self.world_size,
                self.lr,
                self.schedule,
                self.warmup,
                self.clip,
                self.max_norm,
                self.batch,
                self.steps,
            ],
            layout=widgets.Layout(grid_template_columns="repeat(3, 320px)"),
        )
        self.widget = widgets.VBox(
            [header, grid, self.button, self.status, self.output, self.table]
        )

    # ------------------------------------------------------------------ controls
    def _on_strategy(self, change: dict[str, Any]) -> None:
        """Keep the world size sensible when the strategy changes (cheap, nothing trains)."""
        if change["new"] == "single":
            self.world_size.value = 1
        elif self.world_size.value == 1:
            self.world_size.value = 2  # data parallelism needs at least two ranks to show

    def _on_clip(self, change: dict[str, Any]) -> None:
        """max_norm only means something for clip='norm'."""
        self.max_norm.disabled = change["new"] != "norm"

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of ``labkit.run`` for the current control values."""
        return dict(
            self.run_kwargs,
            strategy=self.strategy.value,
            world_size=int(self.world_size.value),
            lr=float(self.lr.value),
            schedule=self.schedule.value,
            warmup_steps=int(self.warmup.value),
            clip=self.clip.value,
            max_norm=float(self.max_norm.value),
            global_batch_size=int(self.batch.value),
            steps=int(self.steps.value),
        )

    # ------------------------------------------------------------------ run one try
    def update(self) -> None:
        """Run one try with the current settings, record it and redraw; never raises on bad input.

        Settings that ``TrainConfig`` rejects, or a worker that fails, give a message in
        ``status`` and leave the table as it was.
        """
        settings = self.settings()
        self._set_message(f"Running try #{len(self.results) + 1}...")
        try:
            result = labkit.run(**settings, progress=False, timeline=False)
        except ValueError as err:
            self.result = None
            self._set_message(f"Not run: {err}", error=True)
            return
        except (labkit.WorkerError, NotImplementedError) as err:
            self.result = None
            first_line = str(err).splitlines()[0]
            self._set_message(f"The run failed: {first_line}", error=True)
            return
        self.result = result
        row = self._record(settings, result)
        self._set_message(self._summary(row))
        self._redraw()

    def _record(self, settings: dict[str, Any], result: RunResult) -> dict[str, Any]:
        """Append one row to ``results`` and the try's validation curve to ``curves``."""
        number = len(self.results) + 1
        final = result.final_val_loss
        row = {
            "try": number,
            "strategy": settings["strategy"],
            "world_size": settings["world_size"],
            "lr": settings["lr"],
            "schedule": settings["schedule"],
            "warmup_steps": settings["warmup_steps"],
            "clip": settings["clip"],
            "max_norm": settings["max_norm"] if settings["clip"] == "norm" else math.nan,
            "batch": settings["global_batch_size"],
            "steps": settings["steps"],
            "wall_s": round(float(result.info["wall_s"]), 2),
            "steps_s": round(wall_breakdown(result)["steps_s"], 2),
            "final_val_loss": round(final, 4),
            "reached": bool(math.isfinite(final) and final <= self.target),
        }
        new = pd.DataFrame([row], columns=list(RESULT_COLUMNS))
        self.results = new if self.results.empty else pd.concat([self.results, new])
        self.results = self.results.reset_index(drop=True)
        label = f"#{number} {settings['strategy']} x{settings['world_size']}"
        self.curves[label] = rank0(result)[["step", "val_loss"]].reset_index(drop=True)
        return row

    def best(self) -> pd.Series | None:
        """The fastest try that reached the target, or None if none has yet."""
        winners = self.results[self.results["reached"].astype(bool)]
        if winners.empty:
            return None
        return winners.loc[winners["wall_s"].idxmin()]

    def _summary(self, row: dict[str, Any]) -> str:
        verdict = "reached the target" if row["reached"] else "did not reach the target"
        text = (
            f"Try #{row['try']}: validation loss {row['final_val_loss']:.3f} {verdict} "
            f"{self.target:g} in {row['wall_s']:.1f} s of wall time "
            f"({row['steps_s']:.1f} s in training steps)."
        )
        best = self.best()
        if best is not None:
            text += f" Fastest so far: #{best['try']} in {best['wall_s']:.1f} s."
        return text

    def _redraw(self) -> None:
        # The last few curves only: a legend of twenty tries hides the plot.
        recent = dict(list(self.curves.items())[-SHOW_CURVES:])
        figure = plot_challenge(recent, self.results, self.target)
        if self.figure is not None:
            plt.close(self.figure)  # replaced: free the old one
        self.figure = figure
        show_figure(self.output, figure)
        show_table(self.table, self.results)
