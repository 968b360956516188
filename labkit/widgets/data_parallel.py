"""The bucket-size panel of notebook 03: choose how many megabytes of gradients go into one
all-reduce, run a short ``dp-bucketed`` training, and see its step time next to the earlier
tries, with the timeline of one step showing each bucket's all-reduce overlapping backward.

Every try is a real two-process run through ``labkit.run``, so it takes a few seconds (starting
the processes is most of it): it runs when Run is pressed, never while the slider moves.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

import labkit
from labkit.plots.data_parallel import plot_bucket_sweep
from labkit.result import RunResult
from labkit.widgets.common import Panel, show_figure

__all__ = ["BucketPanel", "bucket_try"]


def bucket_try(result: RunResult, skip: int = 2) -> dict[str, Any]:
    """One row for the sweep: bucket size, median step time (rank 0), buckets per step.

    The number of buckets is counted from the timeline: one ``allreduce`` span per bucket.
    The first ``skip`` steps (one-off set-up costs) are left out of the median.
    """
    m = result.metrics
    steady = m[(m["rank"] == 0) & (m["step"] >= min(skip, int(m["step"].max())))]
    tl = result.timeline
    spans = tl[(tl["rank"] == 0) & (tl["phase"] == "allreduce")]
    buckets = int(spans.groupby("step").size().median()) if len(spans) else 0
    return {
        "bucket_mb": float(result.config.bucket_mb),
        "step_time_s": float(steady["step_time_s"].median()),
        "buckets": buckets,
    }


class BucketPanel(Panel):
    """A log-scale bucket-size slider and a Run button above the sweep figure.

    ``update()`` trains ``dp-bucketed`` on two processes with the slider's bucket size and
    redraws; the Run button calls it. Afterwards ``result`` is the
    last RunResult (None if the run failed or was rejected), ``tries`` a DataFrame with one row
    per try (``bucket_mb``, ``step_time_s``, ``buckets``), ``figure`` the figure and ``message``
    a one-line summary or the error. Extra keyword arguments go to ``labkit.run``.
    """

    def __init__(
        self,
        bucket_mb: float = 1.0,
        *,
        model: str = "small",
        steps: int = 6,
        world_size: int = 2,
        **run_kwargs: Any,
    ) -> None:
        self.run_kwargs: dict[str, Any] = {
            "model": model,
            "steps": steps,
            "strategy": "dp-bucketed",
            "world_size": world_size,
            "global_batch_size": 8,
            "eval_every": 0,
            "threads": world_size,  # one thread per rank: the ranks share the cores
            **run_kwargs,
        }
        self.bucket_mb = widgets.FloatLogSlider(
            value=bucket_mb,
            base=10,
            min=-2,  # 0.01 MB: a bucket per parameter
            max=1.5,  # ~32 MB: one bucket for the whole small GPT
            step=0.25,
            description="bucket MB",
            readout_format=".3g",
            continuous_update=False,  # nothing runs until Run is pressed; no redraw per pixel
        )
        self.button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.result: RunResult | None = None
        self._tries: list[dict[str, Any]] = []
        self.figure: Figure | None = None
        self.message = ""
        self.button.on_click(lambda _: self.update())
        self.widget = widgets.VBox(
            [widgets.HBox([self.bucket_mb, self.button]), self.status, self.output]
        )

    def update(self) -> None:
        """Run one short dp-bucketed training with the slider's bucket size and redraw.

        A rejected setting or a failed run shows a message; it never raises.
        """
        self.button.disabled = True  # one run at a time
        self._set_message(f"Running dp-bucketed with {self.bucket_mb.value:.3g} MB buckets...")
        try:
            result = labkit.run(
                **self.run_kwargs, bucket_mb=float(self.bucket_mb.value), progress=False
            )
        except (ValueError, labkit.WorkerError) as err:
            self.result = None
            self._set_message(f"Not run: {err}", error=True)
            return
        finally:
            self.button.disabled = False
        self.result = result
        row = bucket_try(result)
        self._tries.append(row)
        self._set_message(
            f"{row['bucket_mb']:.3g} MB buckets: {row['buckets']} all-reduces per step, "
            f"median step {row['step_time_s'] * 1e3:.1f} ms ({len(self.tries)} tries so far)."
        )
        cfg = result.config
        self.figure = plot_bucket_sweep(
            self.tries, result, title=f"dp-bucketed, {cfg.model} GPT, {cfg.world_size} ranks"
        )
        show_figure(self.output, self.figure)

    @property
    def tries(self) -> pd.DataFrame:
        """One row per try so far: ``bucket_mb``, ``step_time_s`` (median), ``buckets``."""
        return pd.DataFrame(self._tries, columns=["bucket_mb", "step_time_s", "buckets"])

    def clear(self) -> None:
        """Forget the earlier tries."""
        self._tries.clear()
