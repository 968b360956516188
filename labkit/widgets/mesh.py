"""The mesh panel of notebook 06: choose dp x pp x tp for 4 processes, train it, see what it cost.

Pick a mesh (every shape the model allows on the ranks) and a data-parallel flavour, press
*train*: the panel trains that mesh for a few steps on real worker processes (warm after the
first run, so a try takes seconds) and shows its measured timeline and a one-row table: step
time, peak parameter memory per rank, bytes sent per step over each dimension, and the largest
difference from the single-process weights.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

import labkit
from labkit.config import DP_IMPLS
from labkit.lessons.mesh import MESH_RUN, compare_meshes, mesh_shapes
from labkit.plots.data_parallel import plot_timeline
from labkit.widgets.common import Panel, show_figure, show_table

__all__ = ["MeshPanel"]


def _name(shape: dict[str, int]) -> str:
    return " x ".join(f"{d}={shape[d]}" for d in ("dp", "pp", "tp"))


class MeshPanel(Panel):
    """Mesh and dp flavour dropdowns, a train button, the timeline and the measured table.

    ``run()`` trains the current choice (the button calls it). Afterwards ``table`` is the
    one-row measurement (``labkit.lessons.mesh.compare_meshes``), ``result`` the RunResult,
    ``figure`` its timeline and ``message`` a one-line summary.
    """

    def __init__(self, world_size: int = 4, model: str = MESH_RUN["model"], **fields: Any) -> None:
        self.world_size, self.model, self.fields = world_size, model, fields
        shapes = mesh_shapes(model, world_size, **fields)
        self.mesh = widgets.Dropdown(
            options=[(_name(s), s) for s in shapes], value=shapes[0], description="mesh"
        )
        self.dp_impl = widgets.Dropdown(
            options=list(DP_IMPLS), value="bucketed", description="dp as"
        )
        self.button = widgets.Button(description="train", button_style="primary")
        self.button.on_click(lambda _: self.run())
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.table_output = widgets.Output()
        self.reference: labkit.RunResult | None = None
        self.table: pd.DataFrame | None = None
        self.result: labkit.RunResult | None = None
        self.figure: Figure | None = None
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.mesh, self.dp_impl, self.button]),
                self.status,
                self.table_output,
                self.output,
            ]
        )

    def run(self) -> None:
        """Train the chosen mesh (and, the first time, the single-process reference)."""
        shape = dict(self.mesh.value)
        choice = dict(shape, dp_impl=self.dp_impl.value) if shape["dp"] > 1 else shape
        if shape["dp"] > 1 and shape["pp"] > 1 and self.dp_impl.value == "ddp":
            self._set_message("DDP cannot run under a pipeline schedule: choose another dp", True)
            return
        self.button.disabled = True
        self._set_message(f"training {_name(shape)} on {self.world_size} processes...")
        try:
            settings = {**MESH_RUN, **self.fields, "model": self.model}
            if self.reference is None:
                self.reference = labkit.run(**settings, progress=False)
            self.table = compare_meshes(
                [choice], reference=self.reference, progress=False, **settings
            )
            self.result = self.table["result"].iloc[0]
            shown = self.table.drop(columns="result").round(3)
            show_table(self.table_output, shown)
            self.figure = plot_timeline(self.result)
            show_figure(self.output, self.figure)
            row = self.table.iloc[0]
            self._set_message(
                f"{row.name}: {row['step_ms']:.0f} ms a step, {row['params_MiB']:.2f} MiB of "
                f"parameters on the fullest rank, weights within {row['max_rel_diff']:.1e} "
                "of the single process"
            )
        except ValueError as err:
            self._set_message(str(err), error=True)
        finally:
            self.button.disabled = False
