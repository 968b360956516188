"""The strategy planner of notebook 05: memory and communication per rank, by formula.

Pick a model preset, a number of ranks, a batch size and a precision: the panel redraws, for DP,
ZeRO-1, FSDP, PP and TP, the memory of the fullest rank and the most bytes any rank sends per
step (``labkit.lessons.parallelism.plan``). Nothing trains, so it redraws at once on every
change; a strategy that cannot split the model over that many ranks is named in the message.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from labkit.lessons.parallelism import PRECISIONS, feasibility, plan, plan_summary
from labkit.model import PRESETS
from labkit.plots.parallelism import plot_plan
from labkit.widgets.common import Panel, show_figure, show_table

__all__ = ["StrategyPlanner"]

WORLD_SIZES = (2, 4, 8, 16, 32, 64)
BATCH_SIZES = (4, 8, 16, 32, 64, 128)


class StrategyPlanner(Panel):
    """Controls (model, ranks, batch, precision) above a figure and a table of the busiest ranks.

    ``update()`` recomputes and redraws (every control change calls it). Afterwards ``result``
    is ``plan``'s table (one row per strategy and rank), ``table`` the fullest rank of each
    strategy in MiB and MB, ``figure`` the figure and ``message`` a one-line summary that also
    names the strategies that cannot be used.
    """

    def __init__(
        self,
        model: str = "medium",
        world_size: int = 8,
        global_batch_size: int = 16,
        precision: str = "fp32",
    ) -> None:
        self.model = widgets.Dropdown(options=list(PRESETS), value=model, description="model")
        self.world_size = widgets.Dropdown(
            options=list(WORLD_SIZES), value=world_size, description="ranks"
        )
        self.batch = widgets.Dropdown(
            options=list(BATCH_SIZES), value=global_batch_size, description="batch"
        )
        self.precision = widgets.ToggleButtons(
            options=list(PRECISIONS), value=precision, description="precision"
        )
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.table_output = widgets.Output()
        self.result: pd.DataFrame | None = None
        self.table: pd.DataFrame | None = None
        self.figure: Figure | None = None
        self.message = ""
        for control in (self.model, self.world_size, self.batch, self.precision):
            control.observe(lambda _: self.update(), names="value")
        controls = widgets.HBox([self.model, self.world_size, self.batch])
        self.widget = widgets.VBox(
            [controls, self.precision, self.status, self.output, self.table_output]
        )

    def update(self) -> None:
        """Recompute the formulas for the current settings and redraw."""
        model, n = self.model.value, int(self.world_size.value)
        try:
            frame = plan(model, n, int(self.batch.value), self.precision.value)
        except ValueError as err:
            self.result = self.table = None
            self._set_message(f"Cannot plan: {err}", error=True)
            return
        self.result = frame
        self.table = plan_summary(frame)
        lightest = self.table.loc[self.table["MiB per rank"].idxmin(), "strategy"]
        quietest = self.table.loc[self.table["MB sent per step (most)"].idxmin(), "strategy"]
        text = f"{model}, {n} ranks: least memory per rank: {lightest}; fewest bytes: {quietest}."
        blocked = feasibility(model, n)
        if blocked:
            text += " Not possible here: " + "; ".join(blocked.values()) + "."
        self._set_message(text)
        self._redraw(f"{model} on {n} ranks, batch {self.batch.value}, {self.precision.value}")

    def _redraw(self, title: str) -> None:
        figure = plot_plan(self.result, title=title)
        if self.figure is not None:
            plt.close(self.figure)  # the old figure is replaced: free it
        self.figure = figure
        show_figure(self.output, figure)
        show_table(self.table_output, self.table)
