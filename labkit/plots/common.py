"""Shared plotting helpers: one figure style for the whole lab, and a figure fingerprint for tests."""

from __future__ import annotations

import hashlib

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep the notebook's inline backend; Agg elsewhere
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.2) -> tuple:
    """A figure and its axes, sized for a notebook cell (``width`` and ``height`` per panel)."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained"
    )
    return fig, (axes[0, 0] if nrows == ncols == 1 else axes.ravel())


def figure_signature(fig: Figure) -> str:
    """A hash of the data drawn on a figure (lines, bars, images), for asserting that it changed."""
    h = hashlib.sha256()
    for ax in fig.get_axes():
        for line in ax.get_lines():
            h.update(line.get_xydata().tobytes())
        for patch in ax.patches:
            h.update(repr(patch.get_extents().bounds).encode())
        for image in ax.get_images():
            h.update(image.get_array().tobytes())
        h.update(ax.get_title().encode())
    return h.hexdigest()[:16]
