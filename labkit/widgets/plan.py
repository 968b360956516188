"""The planner panel of notebook 09: a model, a context, a cluster; the best meshes for it.

Choose the model, the sequence length, the number of GPUs, the card and the link between
nodes, and the global batch (in sequences): the panel runs ``labkit.plan.search`` (a fraction of
a second: it is a model, nothing trains) and shows the best meshes, their predicted time and
memory breakdowns, and says how many meshes do not fit.
"""

from __future__ import annotations

import dataclasses

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

from labkit import plan
from labkit.plots.plan import plot_breakdown
from labkit.widgets.common import Panel, show_figure, show_table

__all__ = ["PlanPanel"]

COLUMNS = [
    "mesh",
    "recompute",
    "micro_batch_size",
    "tokens_per_s_per_gpu",
    "mfu",
    "step_ms",
    "peak_memory_GiB",
    "fits",
]


class PlanPanel(Panel):
    """Dropdowns for the question, and the answer: ``table`` (the ranked meshes), ``figure``
    (breakdowns of the best ones) and ``message`` (the best mesh, or why none fits)."""

    def __init__(
        self,
        model: str = "llama-3.1-8b",
        seq_len: int = 4096,
        gpus: int = 1024,
        card: str = "H100",
        inter: str = "ib-ndr",
        global_batch: int = 1024,
        show: int = 6,
    ) -> None:
        self.show = show
        self.model = widgets.Dropdown(
            options=list(plan.PUBLISHED), value=model, description="model"
        )
        self.seq_len = widgets.Dropdown(
            options=[1024, 2048, 4096, 8192, 16384, 32768], value=seq_len, description="sequence"
        )
        self.gpus = widgets.Dropdown(
            options=[8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], value=gpus, description="GPUs"
        )
        self.card = widgets.Dropdown(options=list(plan.CARDS), value=card, description="card")
        self.inter = widgets.Dropdown(
            options=[k for k in plan.LINKS if not k.startswith(("nvlink", "pcie"))],
            value=inter,
            description="between nodes",
        )
        self.batch = widgets.Dropdown(
            options=[64, 128, 256, 512, 1024, 2048, 4096], value=global_batch, description="batch"
        )
        self.status = widgets.HTML()
        self.table_output = widgets.Output()
        self.output = widgets.Output()
        self.table: pd.DataFrame | None = None
        self.figure: Figure | None = None
        controls = [self.model, self.seq_len, self.gpus, self.card, self.inter, self.batch]
        for control in controls:
            control.observe(lambda _: self.update(), names="value")
        self.widget = widgets.VBox(
            [
                widgets.HBox(controls[:3]),
                widgets.HBox(controls[3:]),
                self.status,
                self.table_output,
                self.output,
            ]
        )
        self.update()

    def update(self) -> None:
        """Search the meshes for the current question and show the answer."""
        shape = dataclasses.replace(plan.PUBLISHED[self.model.value], seq_len=self.seq_len.value)
        cluster = plan.cluster(self.card.value, self.gpus.value, inter=self.inter.value)
        try:
            table = plan.search(shape, cluster, self.batch.value, top=None)
        except ValueError as err:
            self.table = None
            self._set_message(str(err), error=True)
            return
        self.table = table
        fitting = table[table["fits"]]
        misfits = int((~table["fits"]).sum())
        if fitting.empty:
            self._set_message(
                f"none of {len(table)} meshes fits {shape.name} in {cluster.card.name} memory "
                "even with full recomputation: more GPUs, or a card with more memory",
                error=True,
            )
            top = table.head(self.show)
        else:
            best = fitting.iloc[0]
            self._set_message(
                f"best of {len(fitting)} meshes that fit: {best['mesh']}, recompute="
                f"{best['recompute']}: {best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
                f"MFU {best['mfu']:.0%}; {misfits} more do not fit in memory"
            )
            top = fitting.head(self.show)
        show_table(self.table_output, top[COLUMNS].round(3).reset_index(drop=True))
        self.figure = plot_breakdown(list(top["prediction"]), title=cluster.describe())
        show_figure(self.output, self.figure)
