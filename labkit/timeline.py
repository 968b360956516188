"""A recorder of measured events: which rank did what, for which step and micro-batch, and when.

Every strategy records its phases (forward, backward, send, recv, allreduce, optimizer, ...) with
``with timeline.span("forward", step, micro_batch):``. Times are ``time.perf_counter()`` seconds
since a start instant that all ranks share (rank 0's clock is broadcast at start-up; on one machine
``perf_counter`` is the same monotonic clock in every process), so spans from different ranks can
be drawn on one Gantt chart and compared.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

COLUMNS = ("rank", "step", "micro_batch", "phase", "start_s", "end_s")
# Phases that move data between ranks; the rest is computation.
# "norm_allreduce" is clipping's all-reduce of the gradient norm, inside the optimizer span.
COMM_PHASES = frozenset(
    {"send", "recv", "allreduce", "allgather", "reduce_scatter", "broadcast", "wait"}
    | {"norm_allreduce"}
)


class Timeline:
    """Collects (rank, step, micro_batch, phase, start_s, end_s) rows."""

    def __init__(self, rank: int = 0, t0: float | None = None, enabled: bool = True) -> None:
        self.rank = rank
        self.t0 = time.perf_counter() if t0 is None else t0
        self.enabled = enabled
        self.rows: list[tuple[int, int, int, str, float, float]] = []

    def now(self) -> float:
        """Seconds since the shared start."""
        return time.perf_counter() - self.t0

    def add(self, phase: str, step: int, micro_batch: int, start_s: float, end_s: float) -> None:
        """Record an event measured elsewhere (for example an async all-reduce's wait)."""
        if self.enabled:
            self.rows.append((self.rank, step, micro_batch, phase, start_s, end_s))

    @contextmanager
    def span(self, phase: str, step: int, micro_batch: int = -1) -> Iterator[None]:
        """Time the body of a ``with`` block as one event (micro_batch -1: the whole step)."""
        if not self.enabled:
            yield
            return
        start = self.now()
        try:
            yield
        finally:
            self.add(phase, step, micro_batch, start, self.now())

    def durations(self, step: int, nested_comm: bool = False) -> tuple[float, float]:
        """(compute seconds, communication seconds) this rank recorded for ``step``.

        Each is the length of the *union* of its spans: data parallelism's async bucket
        all-reduces overlap each other (and backward), and must not be counted twice.
        With ``nested_comm`` the communication happened *inside* compute spans and blocked them
        (tensor parallelism's all-reduces within forward and backward), so it is taken out of
        the compute time.
        """
        compute, comm = [], []
        for _, s, _, phase, start, end in self.rows:
            if s == step:
                (comm if phase in COMM_PHASES else compute).append((start, end))
        compute_s, comm_s = covered(compute), covered(comm)
        return (compute_s - comm_s if nested_comm else compute_s), comm_s


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping (start, end) intervals; the result is sorted and disjoint."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(intervals: list[tuple[float, float]]) -> float:
    """Total time covered by the intervals, overlaps counted once."""
    return sum(end - start for start, end in merge_intervals(intervals))
