"""RunResult: what ``labkit.run`` returns: metrics, the measured timeline, the trained weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from labkit.config import TrainConfig
from labkit.timeline import COLUMNS as TIMELINE_COLUMNS


@dataclass
class RunResult:
    """The outcome of a run.

    ``metrics``: one row per (step, rank) with at least ``step, rank, loss, lr, grad_norm,
    grad_norm_clipped, step_time_s, tokens_per_s``; ``grad_norm`` is the global norm before clipping.
    ``timeline``: measured events ``rank, step, micro_batch, phase, start_s, end_s``.
    ``layer_norms``: ``step, rank, name, grad_norm`` per parameter (with ``layer_norms=True``).
    ``memory``: one row per rank, bytes measured from the storages it held: ``params_bytes``
    (at the end) and ``peak_params_bytes`` (the most parameter storage alive at once),
    ``grads_bytes``, ``optimizer_bytes``, ``activations_bytes`` (saved for backward, peak) and
    ``peak_bytes``. ``trace_files``: one torch.profiler trace per rank (``profile=True``).
    ``collectives``: each collective the backend ran (``profile=True``), with ``payload_bytes``,
    the measured size of the tensor it worked on, and ``during``: ``"train"`` (a training step,
    also drawn on the timeline) or ``"eval"`` (an evaluation after the step; not on the timeline).
    """

    config: TrainConfig
    metrics: pd.DataFrame
    timeline: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    logs: dict[int, str] = field(default_factory=dict)
    layer_norms: pd.DataFrame = field(default_factory=pd.DataFrame)
    memory: pd.DataFrame = field(default_factory=pd.DataFrame)
    trace_files: list[str] = field(default_factory=list)
    collectives: pd.DataFrame = field(default_factory=pd.DataFrame)
    _state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_ranks(
        cls,
        config: TrainConfig,
        payload: dict[str, Any],
        info: dict[str, Any],
        logs: dict[int, str] | None = None,
    ) -> RunResult:
        """Assemble a result from the rows gathered from every rank.

        ``payload`` holds ``metrics`` (dicts), ``timeline`` and ``layer_norms`` (tuples) and
        ``state`` (the full state dict, or None).
        """
        frame = pd.DataFrame(payload["metrics"])
        if len(frame):
            frame = frame.sort_values(["step", "rank"], kind="stable").reset_index(drop=True)
        tl = pd.DataFrame(payload["timeline"], columns=list(TIMELINE_COLUMNS))
        if len(tl):
            tl = tl.sort_values(["rank", "start_s"], kind="stable").reset_index(drop=True)
        norms = pd.DataFrame(payload["layer_norms"], columns=["step", "rank", "name", "grad_norm"])
        memory = pd.DataFrame(payload.get("memory") or [])
        if len(memory):
            memory = memory.sort_values("rank").reset_index(drop=True)
        state = payload["state"] or {}
        traces = list(payload.get("trace_files") or [])
        collectives = pd.DataFrame(
            payload.get("collectives") or [],
            columns=["rank", "step", "phase", "start_s", "end_s", "payload_bytes", "during"],
        )
        return cls(config, frame, tl, info, logs or {}, norms, memory, traces, collectives, state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model's parameters and buffers on CPU, keyed as ``GPT.state_dict()``."""
        return dict(self._state)

    @property
    def losses(self) -> pd.Series:
        """Training loss per step (rank 0's row; every rank reports the same global loss)."""
        return self.metrics[self.metrics["rank"] == 0].set_index("step")["loss"]

    @property
    def final_val_loss(self) -> float:
        """Validation loss measured after the last step."""
        val = self.metrics["val_loss"].dropna()
        return float(val.iloc[-1]) if len(val) else float("nan")

    def steady_step_s(self, skip: int = 1) -> float:
        """The measured step time: the median, over the steps after the first ``skip`` (which
        pay one-off costs), of the slowest rank (a step ends when every rank is done)."""
        m = self.metrics
        first = int(m["step"].min())
        steady = m[m["step"] >= first + skip]
        steady = steady if len(steady) else m
        return float(steady.groupby("rank")["step_time_s"].median().max())

    def summary(self) -> pd.DataFrame:
        """A one-row-per-rank table: throughput, step time, communication, final losses."""
        m = self.metrics
        steady = m[m["step"] >= min(2, int(m["step"].max()))]  # leave out warm-up steps
        table = steady.groupby("rank").agg(
            step_time_s=("step_time_s", "median"),
            tokens_per_s=("tokens_per_s", "median"),
            compute_s=("compute_s", "median"),
            comm_s=("comm_s", "median"),
            comm_bytes=("comm_bytes", "median"),
        )
        table["final_loss"] = m.groupby("rank")["loss"].last()
        table["final_val_loss"] = m.groupby("rank")["val_loss"].last()
        table["skipped_steps"] = m.groupby("rank")["skipped"].sum()
        return table

    def compare(self, other: RunResult | dict[str, torch.Tensor]) -> pd.DataFrame:
        """Per-tensor relative difference ``||a - b|| / ||a||`` against another run's weights."""
        theirs = other.state_dict() if isinstance(other, RunResult) else other
        return state_dict_differences(self.state_dict(), theirs)

    def to_csv(self, path: str) -> None:
        """Write the metrics as CSV."""
        self.metrics.to_csv(path, index=False)


def state_dict_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per tensor: its name and relative difference ``||a - b|| / max(||a||, tiny)``.

    Norm-wise rather than element-wise, so a parameter whose entries sit near zero is judged by
    its size as a whole. Raises KeyError naming tensors present on one side only.
    """
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise KeyError(f"state dicts differ in keys: {missing[:5]}")
    rows = []
    for name in a:
        x, y = a[name].double(), b[name].double()
        rel = float((x - y).norm() / x.norm().clamp_min(1e-12))
        rows.append({"name": name, "relative_difference": rel})
    return pd.DataFrame(rows)
