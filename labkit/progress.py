"""Progress for long runs: a redrawing bar where someone watches, a line now and then elsewhere.

In a notebook, tqdm's widget; in a terminal, tqdm's bar that redraws in place. When stderr is not
a terminal (CI logs, pipes, files) a redrawing bar becomes thousands of carriage-return frames,
so there a plain line is written every ``LOG_EVERY_S`` seconds and once at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

LOG_EVERY_S = 5.0


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and "IPKernelApp" in shell.get_ipython().config  # type: ignore[union-attr]
    except AttributeError:
        return False


class Progress:
    """``update_to(n)`` as often as you like; ``close()`` at the end (or use it as a context)."""

    def __init__(self, total: int, desc: str, *, disable: bool = False) -> None:
        self.total, self.desc, self.disable = total, desc, disable
        self.n, self._bar, self._last = 0, None, time.monotonic()
        self._start = self._last
        if disable:
            return
        if _in_notebook() or sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False)

    def update_to(self, n: int) -> None:
        """Show that ``n`` of ``total`` are done (throttled where no one redraws)."""
        if self.disable or n == self.n:
            return
        self.n = n
        if self._bar is not None:
            self._bar.n = n
            self._bar.refresh()
        elif time.monotonic() - self._last >= LOG_EVERY_S:
            self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        print(f"{self.desc}: {self.n}/{self.total} steps, {elapsed:.0f} s", file=sys.stderr)

    def close(self) -> None:
        """Remove the bar (or write the final line)."""
        if self.disable:
            return
        if self._bar is not None:
            self._bar.close()
        elif self.n:
            self._line()
        self.disable = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
