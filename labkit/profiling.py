"""Profiling a rank's steps with torch.profiler: a trace per rank, and the collectives that ran.

``RankProfiler`` wraps the training loop of one rank (``TrainConfig.profile=True``). It records
CPU activity (and CUDA's on a GPU), writes a Chrome/Perfetto trace file, and reads back the
collectives the backend ran: Gloo's ``gloo:all_reduce``, ``gloo:broadcast``, ... and NCCL's
``nccl:...`` records, each with its real start and end. These become the timeline's
communication spans, for every strategy alike: torch's DDP and FSDP2 included, whose
collectives labkit's own code never sees.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["COLLECTIVE_PHASES", "RankProfiler"]

# Backend record names (after "gloo:" or "nccl:") -> timeline phase.
COLLECTIVE_PHASES = {
    "all_reduce": "allreduce",
    "allreduce": "allreduce",
    "all_gather": "allgather",
    "allgather": "allgather",
    "_allgather_base": "allgather",
    "all_gather_into_tensor": "allgather",
    "reduce_scatter": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast": "broadcast",
    "send": "send",
    "recv": "recv",
    "barrier": "wait",
}


CLOCK_MARK = "labkit:clock"  # a marker event that ties the profiler's clock to perf_counter

# Profiler dtype names -> bytes per element.
DTYPE_BYTES = {
    "float": 4,
    "double": 8,
    "c10::BFloat16": 2,
    "c10::Half": 2,
    "long int": 8,
    "int": 4,
    "unsigned char": 1,
    "bool": 1,
}


def _payload_bytes(shapes: list[list[int]], dtypes: list[str]) -> int:
    """Bytes of the tensor a backend record worked on (its first input), from the profile."""
    if not shapes:
        return 0
    numel = 1  # a 0-dim tensor (shape []) holds one element
    for n in shapes[0]:
        numel *= int(n)
    return numel * DTYPE_BYTES.get(dtypes[0] if dtypes else "float", 4)


def _collective_records(profile: Any) -> tuple[float, list[tuple[str, float, float, int]]]:
    """The clock mark's time and (phase, start_s, end_s, payload_bytes) of every backend
    record, on the profiler's clock. Read from Kineto's raw events: building torch's
    ``EventList`` (``events()``) costs seconds for a few steps of a small model."""
    raw = getattr(getattr(profile, "profiler", None), "kineto_results", None)
    mark, found = 0.0, []
    if raw is not None:
        for e in raw.events():
            name = e.name()
            if name == CLOCK_MARK:
                mark = e.start_ns() / 1e9
            elif (phase := _phase(name)) is not None:
                start = e.start_ns() / 1e9
                end = start + e.duration_ns() / 1e9
                found.append((phase, start, end, _payload_bytes(e.shapes(), e.dtypes())))
        return mark, found
    for e in profile.events():  # older profilers
        if e.name == CLOCK_MARK:
            mark = e.time_range.start / 1e6
        elif (phase := _phase(e.name)) is not None:
            shapes = getattr(e, "input_shapes", None) or []
            dtypes = getattr(e, "input_dtypes", None) or []
            found.append(
                (
                    phase,
                    e.time_range.start / 1e6,
                    e.time_range.end / 1e6,
                    _payload_bytes(shapes, dtypes),
                )
            )
    return mark, found


def _phase(name: str) -> str | None:
    backend, _, op = name.partition(":")
    if backend not in ("gloo", "nccl") or not op:
        return None
    return COLLECTIVE_PHASES.get(op.strip().lower(), "allreduce" if "reduce" in op else None)


class RankProfiler:
    """Context manager around a rank's steps; afterwards ``trace_file`` and ``spans``.

    ``spans`` are ``(phase, start, end, payload_bytes)``, times in ``time.perf_counter`` seconds
    so they line up with the timeline (whose clock is the same), and the bytes of the tensor the
    backend worked on (the message, before the algorithm's factor: a ring all-reduce sends
    ``2 (N-1)/N`` of it per rank).
    """

    def __init__(self, path: Path, cuda: bool = False) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.path = Path(path)
        # record_shapes: each backend record then carries its tensor's shape and dtype, which is
        # the message size that really went to the backend.
        self._profile = profile(activities=activities, record_shapes=True)
        self.trace_file: str | None = None
        self.spans: list[tuple[str, float, float, int]] = []

    def __enter__(self) -> RankProfiler:
        from torch.profiler import record_function

        self._profile.__enter__()
        # The profiler's event times are microseconds from its own origin. A marker event taken
        # together with a perf_counter reading ties that origin to our clock (to microseconds;
        # reading the clock after __enter__ instead would be off by however long it took).
        with record_function("labkit:warm-up"):  # the first record pays a one-off set-up
            pass
        with record_function(CLOCK_MARK):
            self._mark = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(str(self.path))
        self.trace_file = str(self.path)
        mark, records = _collective_records(self._profile)
        origin = self._mark - mark  # perf_counter = profiler clock + origin
        self.spans = [(phase, origin + a, origin + b, n) for phase, a, b, n in records]


def cuda_activity(device: torch.device) -> bool:
    """Whether to record CUDA activity on this device."""
    return device.type == "cuda"
