"""ipywidgets panels for the notebooks, one module per lesson.

Each panel is a class that builds its controls and an Output area, and redraws through a plain
method (``update()``) that tests call after setting a control's ``value``: the panels are tested
without a browser. Expensive work (a training run) happens on a button press or on change of a
control with ``continuous_update=False``, never on every pixel of a slider drag.
"""
