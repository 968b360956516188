"""Matplotlib figures for the notebooks, one module per lesson; every function returns a Figure.

Functions take data (a RunResult, a DataFrame, a Schedule) and draw it; they never train. That
keeps notebook cells short and lets tests check that a figure changes when its input does.
"""

from labkit.plots.common import figure_signature, new_figure

__all__ = ["figure_signature", "new_figure"]
