"""The clipping panel of notebook 01: pick a clipping method, a threshold and a learning rate,
press Train, and see the loss, the gradient norm before/after clipping and the per-layer norms.

Every press trains a short GPT run through ``labkit.run`` (the one training loop), so what the
panel shows is what the real loop does.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

import labkit
from labkit.clip import CLIP_METHODS
from labkit.lessons.clipping import summarize_runs
from labkit.plots.clipping import plot_clipping_run
from labkit.result import RunResult
from labkit.widgets.common import Panel, show_figure

__all__ = ["THRESHOLD_FIELDS", "ClippingPanel"]

# Which TrainConfig field the one threshold slider sets for each method, and its usual value.
THRESHOLD_FIELDS: dict[str, tuple[str | None, float]] = {
    "none": (None, 1.0),
    "norm": ("max_norm", 1.0),
    "value": ("clip_value", 0.01),
    "agc": ("agc_clip_factor", 0.01),
    "autoclip": ("autoclip_percentile", 10.0),
    "zclip": ("zclip_z", 2.5),
}


class ClippingPanel(Panel):
    """Controls (method, threshold, learning rate, Train) above a figure of one short GPT run.

    ``update()`` trains and redraws; the Train button calls it. After it, ``result`` holds the
    RunResult (None if the settings were rejected), ``figure`` the figure, ``message`` a one-line
    summary or the error. Extra keyword arguments are passed to ``labkit.run`` (e.g. ``steps``).
    """

    def __init__(
        self,
        method: str = "norm",
        threshold: float = 1.0,
        lr: float = 2.0,
        *,
        model: str = "nano",
        optimizer: str = "sgd",
        steps: int = 40,
        **run_kwargs: Any,
    ) -> None:
        self.run_kwargs: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "steps": steps,
            "threads": 1,  # a tiny model runs fastest on one thread (and shares the CPU well)
            **run_kwargs,
        }
        self.method = widgets.Dropdown(options=CLIP_METHODS, value=method, description="clip")
        # One log-scale slider serves every method: its meaning (label) follows the dropdown.
        self.threshold = widgets.FloatLogSlider(
            value=threshold,
            base=10,
            min=-3,
            max=2,
            step=0.1,
            continuous_update=False,
            readout_format=".3g",
        )
        self.lr = widgets.FloatLogSlider(
            value=lr,
            base=10,
            min=-3,
            max=1,
            step=0.1,
            description="lr",
            continuous_update=False,
            readout_format=".3g",
        )
        self.button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.result: RunResult | None = None
        self.figure: Figure | None = None
        self.message = ""

        self.method.observe(self._on_method, names="value")
        self.button.on_click(lambda _: self.update())
        self._label_threshold()
        controls = widgets.HBox([self.method, self.threshold, self.lr, self.button])
        self.widget = widgets.VBox([controls, self.status, self.output])

    # ------------------------------------------------------------------ controls
    def _on_method(self, change: dict[str, Any]) -> None:
        """A new method: relabel the slider and move it to that method's usual value (cheap)."""
        self._label_threshold()
        field, usual = THRESHOLD_FIELDS[change["new"]]
        if field is not None:
            self.threshold.value = usual

    def _label_threshold(self) -> None:
        field, _ = THRESHOLD_FIELDS[self.method.value]
        self.threshold.description = field or "(unused)"
        self.threshold.disabled = field is None

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of ``labkit.run`` for the current control values."""
        kwargs = dict(self.run_kwargs, clip=self.method.value, lr=float(self.lr.value))
        field, _ = THRESHOLD_FIELDS[self.method.value]
        if field is not None:
            kwargs[field] = float(self.threshold.value)
        return kwargs

    # ------------------------------------------------------------------ train and draw
    def update(self) -> None:
        """Train one short run with the current settings and redraw; never raises on bad input."""
        self.button.disabled = True  # one run at a time
        self._set_message("Training...")
        try:
            result = labkit.run(**self.settings(), layer_norms=True, progress=False, timeline=False)
        except ValueError as err:  # rejected settings: say why, keep the previous figure
            self.result = None
            self._set_message(f"Not trained: {err}", error=True)
            return
        finally:
            self.button.disabled = False
        self.result = result
        self._set_message(self._summary(result))
        self._redraw(result)

    def _summary(self, result: RunResult) -> str:
        row = summarize_runs({"run": result}).iloc[0]
        if pd.notna(row["nonfinite_from"]):
            return (
                f"Diverged: the loss is nan/inf from step {int(row['nonfinite_from'])} on "
                f"({int(row['skipped_steps'])} steps skipped for a non-finite gradient norm)."
            )
        return (
            f"Loss {row['start_loss']:.2f} -> {row['end_loss']:.2f} (mean of the first and last "
            f"5 steps), validation loss {row['val_loss']:.3f}; "
            f"largest gradient norm {row['largest_grad_norm']:.3g}, clipped on "
            f"{int(row['clipped_steps'])} of {result.config.steps} steps."
        )

    def _redraw(self, result: RunResult) -> None:
        s = self.settings()
        field, _ = THRESHOLD_FIELDS[s["clip"]]
        setting = f"clip={s['clip']}" + (f", {field}={s[field]:.3g}" if field else "")
        figure = plot_clipping_run(result, title=f"{setting}, lr={s['lr']:.3g}")
        self.figure = figure
        show_figure(self.output, figure)
