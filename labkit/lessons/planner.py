"""Helpers for notebook 09 (the planner) and ``labkit bench plan``: predictions beside runs.

``LOCAL_MESHES`` lists every strategy and mesh this machine can run on 1, 2, 4 and 8 processes;
``check_against_runs`` trains them (each world size in one set of worker processes) and puts
what ``labkit.plan.predict`` said beside what was measured: the slowest rank's median step time
and the fullest rank's peak bytes (parameters, gradients, optimizer state, saved activations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

import labkit
from labkit import plan
from labkit.config import TrainConfig
from labkit.launch import run_many
from labkit.lessons.recorded import recorded_path
from labkit.plan.calibrate import PLAN_RUN

__all__ = [
    "LOCAL_MESHES",
    "NOTEBOOK_MESHES",
    "PLAN_RUN",
    "check_against_runs",
    "error_summary",
    "recorded_summary",
]

LOCAL_MESHES: dict[int, list[dict[str, Any]]] = {
    1: [{}, {"recompute": "full"}],
    2: [
        {"dp": 2, "dp_impl": "naive"},
        {"dp": 2, "dp_impl": "bucketed"},
        {"dp": 2, "dp_impl": "ddp"},
        {"dp": 2, "dp_impl": "zero1"},
        {"dp": 2, "dp_impl": "zero2"},
        {"dp": 2, "dp_impl": "fsdp"},
        {"pp": 2, "micro_batches": 2, "pp_schedule": "gpipe"},
        {"pp": 2, "micro_batches": 4, "pp_schedule": "1f1b"},
        {"pp": 2, "micro_batches": 4, "pp_schedule": "torch-1f1b"},
        {"pp": 2, "micro_batches": 4, "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2},
        {"pp": 2, "micro_batches": 4, "pp_schedule": "zb-h1"},
        {"tp": 2},
        {"cp": 2},
    ],
    4: [
        {"dp": 4, "dp_impl": "bucketed"},
        {"dp": 4, "dp_impl": "zero3"},
        {"dp": 2, "tp": 2},
        {"tp": 4},
        {"dp": 2, "pp": 2, "micro_batches": 2},
        {"pp": 2, "tp": 2, "micro_batches": 2},
        {"pp": 4, "micro_batches": 4},
        {"dp": 2, "cp": 2},
    ],
    8: [{"dp": 8, "dp_impl": "bucketed"}, {"dp": 2, "pp": 2, "tp": 2, "micro_batches": 2}],
}


# The notebook's live check: one of each kind, on 2 and 4 processes (the rest is recorded).
NOTEBOOK_MESHES: dict[int, list[dict[str, Any]]] = {
    2: [
        {"dp": 2, "dp_impl": "bucketed"},
        {"dp": 2, "dp_impl": "zero2"},
        {"pp": 2, "micro_batches": 4, "pp_schedule": "1f1b"},
        {"tp": 2},
        {"cp": 2},
    ],
    4: [{"dp": 2, "tp": 2}, {"dp": 2, "pp": 2, "micro_batches": 2}, {"pp": 4, "micro_batches": 4}],
}


def recorded_summary(path: Path | None = None) -> pd.DataFrame:
    """``error_summary`` of the sweep ``labkit bench plan --record`` saved (every local mesh)."""
    return error_summary(pd.read_csv(path or recorded_path("plan", suffix="csv")))


def _measure(configs: list[TrainConfig], progress: bool) -> list[dict[str, float]]:
    if configs[0].world_size == 1:  # one process: no workers to share
        results = [labkit.run(cfg) for cfg in configs]
    else:
        results = run_many(configs, progress=progress, desc="runs")
    rows = []
    for result in results:
        rows.append(
            {
                "measured_step_ms": 1e3 * result.steady_step_s(skip=2),
                "measured_MiB": result.memory["peak_bytes"].max() / 2**20,
            }
        )
    return rows


def check_against_runs(
    models: Sequence[str] = ("micro",),
    world_sizes: Sequence[int] = (1, 2, 4),
    *,
    meshes: dict[int, list[dict[str, Any]]] | None = None,
    cluster_for: Callable[[int], plan.Cluster] | None = None,
    progress: bool = True,
    **fields: Any,
) -> pd.DataFrame:
    """Predict, then train, each mesh of ``meshes`` (default ``LOCAL_MESHES``) for each model.

    One row per (model, mesh): ``predicted_step_ms`` and ``measured_step_ms``,
    ``predicted_MiB`` and ``measured_MiB`` (the fullest rank's parameters, gradients, optimizer
    state and saved activations) and the relative errors ``step_error`` and ``memory_error``
    (predicted / measured - 1). ``cluster_for(n)`` gives the cluster for ``n`` processes
    (default ``plan.local_cluster(n)``, calibrated on first use).
    """
    meshes = meshes or LOCAL_MESHES
    cluster_for = cluster_for or plan.local_cluster
    rows = []
    for n in world_sizes:
        configs = [
            TrainConfig(**{**PLAN_RUN, **fields, "model": model, **mesh})
            for model in models
            for mesh in meshes[n]
        ]
        cluster = cluster_for(n)
        predicted = [plan.predict(cfg, cluster) for cfg in configs]
        measured = _measure(configs, progress)
        for cfg, p, got in zip(configs, predicted, measured, strict=True):
            label = "single" if cfg.world_size == 1 else cfg.label
            if cfg.recompute != "none":
                label += f", recompute={cfg.recompute}"
            mem = p.memory
            predicted_mib = sum(v for k, v in mem.items() if k != "transient_bytes") / 2**20
            rows.append(
                {
                    "model": cfg.model,
                    "ranks": cfg.world_size,
                    "mesh": label,
                    "predicted_step_ms": 1e3 * p.step_time_s,
                    **got,
                    "predicted_MiB": predicted_mib,
                }
            )
    table = pd.DataFrame(rows)
    table["step_error"] = table["predicted_step_ms"] / table["measured_step_ms"] - 1
    table["memory_error"] = table["predicted_MiB"] / table["measured_MiB"] - 1
    return table


def error_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median and worst absolute relative error of step time and memory, per model and all."""
    rows = []
    for name, part in [*table.groupby("model"), ("all", table)]:
        rows.append(
            {
                "model": name,
                "runs": len(part),
                "step: median abs. error": part["step_error"].abs().median(),
                "step: worst abs. error": part["step_error"].abs().max(),
                "memory: median abs. error": part["memory_error"].abs().median(),
                "memory: worst abs. error": part["memory_error"].abs().max(),
            }
        )
    return pd.DataFrame(rows).set_index("model")
