"""What every panel shares: a status line, figure and table output, and notebook display.

Figures go into an ``Output`` widget by setting its ``outputs`` to a PNG display item, not by
capturing ``display()`` inside ``with output:``. That behaves the same in a button callback, a
notebook cell, a test and a headless run (capture depends on the front-end), and it avoids a
stall seen when executing widget notebooks head-less (jupyter/nbclient#312).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def figure_item(figure: Figure, dpi: int = 80) -> dict[str, Any]:
    """A figure as one Jupyter ``display_data`` output (PNG plus a text fallback)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {
        "output_type": "display_data",
        "data": {"image/png": png, "text/plain": repr(figure)},
        "metadata": {},
    }


def table_item(frame: pd.DataFrame) -> dict[str, Any]:
    """A DataFrame as one ``display_data`` output (HTML plus text)."""
    return {
        "output_type": "display_data",
        "data": {"text/html": frame.to_html(), "text/plain": frame.to_string()},
        "metadata": {},
    }


def show_figure(output: widgets.Output, figure: Figure) -> None:
    """Show ``figure`` in ``output`` (replacing what was there) and release it from pyplot.

    Closing it in pyplot frees memory over many presses and keeps the inline backend from
    drawing it again in a later cell; the Figure object itself stays usable.
    """
    output.outputs = (figure_item(figure),)
    plt.close(figure)


def show_table(output: widgets.Output, frame: pd.DataFrame) -> None:
    """Show a DataFrame in ``output``, replacing what was there."""
    output.outputs = (table_item(frame),)


class Panel:
    """Base of the lesson panels: ``widget`` (the layout), ``status`` and ``message``.

    Subclasses build ``self.widget`` and ``self.status`` and implement ``update()``.
    """

    widget: widgets.Widget
    status: widgets.HTML
    message: str = ""

    def _set_message(self, text: str, error: bool = False) -> None:
        self.message = text
        color = "#b00020" if error else "inherit"
        self.status.value = f"<span style='color:{color}'>{html.escape(text)}</span>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Display the panel's widgets when the panel is the value of a notebook cell."""
        return self.widget._repr_mimebundle_(**kwargs)
