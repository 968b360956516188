"""The loss-scaling panel of notebook 08: slide the loss scale and watch which gradient values
fp16 keeps, flushes to zero or overflows. Nothing trains: the gradients were measured once (a real
fp32 backward pass), so every move redraws at once."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from labkit.lessons.precision import fp16_fate
from labkit.plots.precision import plot_fp16_range
from labkit.widgets.common import Panel, show_figure

__all__ = ["ScalerPanel"]


class ScalerPanel(Panel):
    """A log2 loss-scale slider above the histogram of ``magnitudes`` (|gradient| values).

    ``update()`` redraws for the slider's value; afterwards ``figure`` holds the figure, ``fate``
    the fractions (``labkit.lessons.precision.fp16_fate``) and ``message`` a one-line summary.
    """

    def __init__(self, magnitudes: np.ndarray, log2_scale: int = 0) -> None:
        self.magnitudes = magnitudes
        self.scale = widgets.IntSlider(
            value=log2_scale, min=-8, max=40, description="log2 scale", continuous_update=False
        )
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.figure: Figure | None = None
        self.fate: dict[str, Any] = {}
        self.scale.observe(lambda _: self.update(), names="value")
        self.widget = widgets.VBox([self.scale, self.status, self.output])

    def update(self) -> None:
        """Redraw for the current scale."""
        scale = 2.0**self.scale.value
        self.fate = fp16_fate(self.magnitudes, scale)
        self.figure = plot_fp16_range(self.magnitudes, scale)
        show_figure(self.output, self.figure)
        self._set_message(
            f"loss x 2^{self.scale.value}: in fp16 {100 * self.fate['normal']:.1f}% of the "
            f"gradient values keep full precision, {100 * self.fate['subnormal']:.1f}% are "
            f"subnormal (fewer bits), {100 * self.fate['flushed_to_zero']:.2f}% become 0, "
            f"{100 * self.fate['overflow']:.2f}% become inf"
            + (" (the scaler would skip the step)" if self.fate["overflow"] > 0 else "")
        )
