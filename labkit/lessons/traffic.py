"""Bytes on the wire: the messages a run really handed to the backend, next to the formula.

A profiled run (``TrainConfig(profile=True)``) records every collective the backend ran, with the
size of the tensor it was handed (``RunResult.collectives``, ``payload_bytes``): that is the
measurement. What crosses the wire for a message depends on the algorithm the backend picked,
so it is a prediction twice over:

* ``ring_wire_bytes`` applies the ring's factor to each *measured* message (what a ring would
  put on the wire per rank for exactly these messages);
* labkit's ``comm_bytes`` counter applies the same factors to the collectives each strategy
  *means* to run (``labkit.parallel.base.ring_bytes``): a formula.

When the two disagree, the backend ran something other than what the strategy asked for. The
notable case on Gloo: it has no reduce-scatter of its own and runs an all-reduce of the whole
tensor instead (each rank then keeps its shard), so ZeRO-2, ZeRO-3 and FSDP send about twice
their gradients' reduce-scatter bytes there. NCCL runs a real reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from labkit.result import RunResult

__all__ = ["RING_WIRE_FACTOR", "measured_traffic", "traffic_table"]

# Bytes one rank puts on the wire per byte of a recorded message, for a ring over n ranks. The
# payload the profiler records is the tensor the rank handed over: the full tensor for an
# all-reduce or a broadcast, the rank's own shard for an all-gather. A broadcast's root sends
# the tensor once around (or down) the group: averaged over roots, (n - 1) / n per rank.
RING_WIRE_FACTOR = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "allgather": lambda n: n - 1,
    "broadcast": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
    "wait": lambda n: 0.0,
}


def measured_traffic(run: RunResult, skip: int = 1) -> pd.DataFrame:
    """Per rank and kind of collective, the median per training step of what ran.

    Columns: ``rank``, ``phase`` (allreduce, allgather, broadcast, send, ...), ``calls``,
    ``payload_bytes`` (measured: the tensors handed to the backend) and ``ring_wire_bytes``
    (prediction: those messages times the ring's factor for the run's world size; for a 1-D
    run, where every collective spans all ranks). Evaluations and the first ``skip`` steps are
    left out. Needs a run with ``profile=True``.
    """
    col = run.collectives
    if col.empty:
        raise ValueError("measured_traffic needs a run with TrainConfig(profile=True)")
    col = col[(col["during"] == "train") & (col["step"] >= skip)]
    n = run.config.world_size
    per_step = (
        col.groupby(["rank", "phase", "step"])["payload_bytes"]
        .agg(["count", "sum"])
        .groupby(["rank", "phase"])
        .median()
        .reset_index()
        .rename(columns={"count": "calls", "sum": "payload_bytes"})
    )
    factor = per_step["phase"].map(lambda p: RING_WIRE_FACTOR.get(p, lambda n: 1.0)(n))
    per_step["ring_wire_bytes"] = per_step["payload_bytes"] * factor
    return per_step


def traffic_table(runs: Mapping[str, RunResult], skip: int = 1) -> pd.DataFrame:
    """One row per run (its busiest rank): measured messages next to labkit's counter, in MB.

    ``payload_MB``: the tensors handed to the backend per step (measured); ``ring_wire_MB``: what
    a ring puts on the wire for those messages (prediction from the measurement);
    ``counter_MB``: labkit's ``comm_bytes`` (prediction from the strategy's plan); ``calls``:
    collectives per step; ``by_kind``: the payload split by collective. A ratio
    ``ring_wire_MB / counter_MB`` away from 1 means the backend ran other collectives than
    planned.
    """
    rows = []
    for label, run in runs.items():
        traffic = measured_traffic(run, skip)
        per_rank = traffic.groupby("rank")[["calls", "payload_bytes", "ring_wire_bytes"]].sum()
        rank = int(per_rank["ring_wire_bytes"].idxmax())
        kinds = traffic[traffic["rank"] == rank]
        m = run.metrics
        counter = m[(m["rank"] == rank) & (m["step"] >= skip)]["comm_bytes"].median()
        rows.append(
            {
                "run": label,
                "rank": rank,
                "calls": int(per_rank.loc[rank, "calls"]),
                "payload_MB": per_rank.loc[rank, "payload_bytes"] / 1e6,
                "ring_wire_MB": per_rank.loc[rank, "ring_wire_bytes"] / 1e6,
                "counter_MB": counter / 1e6,
                "by_kind": ", ".join(
                    f"{p} {b / 1e6:.2f}"
                    for p, b in zip(kinds["phase"], kinds["payload_bytes"], strict=True)
                    if b
                ),
            }
        )
    table = pd.DataFrame(rows).set_index("run")
    table["wire_over_counter"] = table["ring_wire_MB"] / table["counter_MB"]
    return table
