"""Reading a torch.profiler trace (the Chrome/Perfetto JSON a profiled run writes per rank).

``trace_ops`` turns one rank's trace into a table of its *top-level* operations per thread (an
operation not nested inside another on the same thread), each with a kind: matmul, attention,
communication, optimizer or other. That is what a person sees first when opening the trace in
Perfetto, and what notebook 08 draws as a picture. Gloo runs asynchronous collectives on its own
threads, so those show as separate lanes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

__all__ = ["last_step", "op_kind", "trace_ops"]

# First match wins; names are torch's operator and annotation names.
KINDS = (
    ("communication", ("gloo:", "nccl:", "c10d::", "record_param_comms")),
    ("optimizer", ("Optimizer.",)),
    ("attention", ("softmax", "scaled_dot_product", "Softmax", "attention")),
    ("matmul", ("mm", "linear", "Linear", "matmul", "Mm", "addmm", "Addmm")),
)


def op_kind(name: str) -> str:
    """The kind of a trace event, from its name."""
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def trace_ops(path: str | Path, min_us: float = 0.0) -> pd.DataFrame:
    """Top-level operations of a trace: ``thread``, ``name``, ``kind``, ``start_ms``, ``dur_ms``.

    Times are milliseconds from the trace's first operation; operations shorter than ``min_us``
    microseconds are left out. The labkit clock markers are dropped.
    """
    events = json.loads(Path(path).read_text())["traceEvents"]
    ops = [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in ("cpu_op", "user_annotation")
        and not str(e.get("name", "")).startswith("labkit:")
    ]
    if not ops:
        return pd.DataFrame(columns=["thread", "name", "kind", "start_ms", "dur_ms"])
    ops.sort(key=lambda e: (e["tid"], e["ts"], -e.get("dur", 0)))
    rows, open_end = [], {}
    for e in ops:
        end = e["ts"] + e.get("dur", 0)
        if e["ts"] < open_end.get(e["tid"], float("-inf")):
            continue  # nested inside the current top-level op of this thread
        open_end[e["tid"]] = end
        if e.get("dur", 0) >= min_us:
            rows.append((e["tid"], e["name"], op_kind(e["name"]), e["ts"], e.get("dur", 0)))
    frame = pd.DataFrame(rows, columns=["thread", "name", "kind", "start_us", "dur_us"])
    t0 = frame["start_us"].min()
    frame["start_ms"] = (frame["start_us"] - t0) / 1e3
    frame["dur_ms"] = frame["dur_us"] / 1e3
    threads = {
        tid: i
        for i, tid in enumerate(
            frame.groupby("thread")["dur_us"].sum().sort_values(ascending=False).index
        )
    }
    frame["thread"] = frame["thread"].map(threads)  # 0: the busiest (the training loop)
    return frame[["thread", "name", "kind", "start_ms", "dur_ms"]]


def last_step(ops: pd.DataFrame) -> pd.DataFrame:
    """The operations of the trace's last training step, times from that step's start.

    A step ends with its optimizer step (``Optimizer.step#...``, torch's own annotation): the
    last step is everything after the one-but-last optimizer step ended, up to the end of the
    last one, on every thread.
    """
    steps = ops[ops["name"].str.startswith("Optimizer.step")]
    if len(steps) < 2:
        return ops
    start = float(steps["start_ms"].iloc[-2] + steps["dur_ms"].iloc[-2])
    end = float(steps["start_ms"].iloc[-1] + steps["dur_ms"].iloc[-1])
    mine = ops[(ops["start_ms"] >= start) & (ops["start_ms"] < end)].copy()
    mine["start_ms"] -= start
    return mine
