"""``local_cluster()``: this machine as a cluster, calibrated by measuring it.

Three measurements, none of them the multi-rank runs the planner is then checked against:

1. the matrix-multiply ceiling (``labkit.perf.peak_matmul_flops``, what ``labkit bench peak``
   reports) and the memory bandwidth of a large element-wise add;
2. one-process training steps of a few presets at two batch sizes, with the threads each rank of
   an ``n``-rank run gets. They fit ``step = overhead x layers + FLOPs / rate(d)``, where
   ``rate(d) = R d / (d + d_half)``: narrow matrices run far below the ceiling on a CPU;
3. ``dist.all_reduce`` over Gloo at several sizes on 2, 4 and 8 processes (labkit's collective
   benchmark), fitted to ``alpha + bus bytes x beta`` per group size (``plan.comm``).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from labkit.config import TrainConfig
from labkit.plan.comm import fit_alpha_beta
from labkit.plan.hardware import Card, Cluster

__all__ = ["Calibration", "calibrate", "local_cluster"]

CALIBRATION_MODELS = ("nano", "micro", "small")
# Short runs with the lab's usual knobs on (clipping, warm-up, cosine): the in-step calibration
# and the planner's checks against runs (labkit.lessons.planner) use the same settings.
PLAN_RUN: dict[str, Any] = dict(
    steps=6,
    global_batch_size=8,
    clip="norm",
    max_norm=0.5,
    schedule="cosine",
    warmup_steps=2,
    eval_every=0,
    timeline=False,
    progress=False,
)
CALIBRATION_BATCHES = (4, 16)
ALLREDUCE_SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20)


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured, and the fits made from it."""

    threads: int
    ceiling_flops: float  # best float32 matmul FLOP/s
    memory_Bps: float
    rate_flops: float  # R: the fitted compute rate on wide matrices
    half_rate_width: float  # d_half
    overhead_s: float  # per layer and micro-batch
    collectives: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Seconds a collective costs inside a training step beyond the benchmark's back-to-back
    # alpha (processes that share cores reach it at different times), per world size.
    sync_s: dict[int, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)  # the one-process measurements
    allreduce: list[dict[str, Any]] = field(default_factory=list)


def _memory_bandwidth(numel: int = 1 << 23, repeats: int = 5) -> float:
    a, b = torch.ones(numel), torch.ones(numel)
    a.add_(b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a.add_(b)
        best = min(best, time.perf_counter() - start)
    return 3 * 4 * numel / best  # read a and b, write a


def _step_rows(threads: int, models: Sequence[str], batches: Sequence[int]) -> list[dict]:
    import labkit
    from labkit.plan.workload import workload

    rows = []
    for model in models:
        for batch in batches:
            fields = dict(model=model, global_batch_size=batch, steps=5, eval_every=0)
            result = labkit.run(**fields, threads=threads, timeline=False, progress=False)
            w = workload(fields)
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "d_model": w.model.d_model,
                    "layers": w.model.n_layer + 2,
                    "flops": batch * w.model.seq_len * w.model.train_flops_per_token(),
                    "params": w.model.params(),
                    "step_s": result.steady_step_s(skip=2),
                }
            )
    return rows


def _fit_compute(rows: list[dict], memory_Bps: float) -> tuple[float, float, float]:
    """(R, d_half, overhead) minimising the squared relative error over the rows."""
    import numpy as np

    best = None
    for d_half in np.linspace(0, 512, 129):
        # time - optimizer = overhead * layers + flops * (d + d_half) / d * (1 / R): linear.
        a = np.array(
            [[r["layers"], r["flops"] * (r["d_model"] + d_half) / r["d_model"]] for r in rows]
        )
        y = np.array([r["step_s"] - 2 * 16 * r["params"] / memory_Bps for r in rows])
        weight = 1 / np.array([r["step_s"] for r in rows])
        coef, *_ = np.linalg.lstsq(a * weight[:, None], y * weight, rcond=None)
        coef = np.maximum(coef, 1e-15)
        err = float(np.sum(((a @ coef - y) * weight) ** 2))
        if best is None or err < best[0]:
            best = (err, float(1 / coef[1]), float(d_half), float(coef[0]))
    assert best is not None
    return best[1], best[2], best[3]


def _allreduce_worker(rank: int, world_size: int, sizes: Sequence[int]) -> list[dict]:
    """On every rank: time torch's all-reduce at each size (module level: spawn imports it)."""
    from labkit.perf import allreduce_times

    return allreduce_times(sizes, iters=10)


def _allreduce_rows(world_sizes: Sequence[int], backend: str = "gloo") -> list[dict]:
    from labkit.supervisor import spawn

    rows: list[dict] = []
    for n in world_sizes:
        rows += spawn(_allreduce_worker, n, (tuple(ALLREDUCE_SIZES),), backend=backend)[0]
    return rows


# The runs the in-step cost of a collective is fitted on: nano (not a validation model), one
# mesh of each kind per world size.
SYNC_MESHES: dict[int, list[dict[str, Any]]] = {
    2: [
        {"dp": 2, "dp_impl": "naive"},
        {"dp": 2, "dp_impl": "bucketed"},
        {"pp": 2, "micro_batches": 2},
        {"tp": 2},
    ],
    4: [
        {"dp": 4, "dp_impl": "naive"},
        {"dp": 4, "dp_impl": "bucketed"},
        {"pp": 4, "micro_batches": 4},
        {"dp": 2, "tp": 2},
    ],
    8: [
        {"dp": 8, "dp_impl": "naive"},
        {"dp": 8, "dp_impl": "bucketed"},
        {"dp": 2, "pp": 2, "tp": 2, "micro_batches": 2},
    ],
}


def _cluster(c: Calibration, n: int, sync: float | None = None) -> Cluster:
    """The cluster a calibration describes, for ``n`` ranks (``sync`` overrides the fit)."""
    cores = os.cpu_count() or 1
    extra = c.sync_s.get(n, 0.0) if sync is None else sync
    card = Card(
        name=f"this CPU ({c.threads} thread{'s' * (c.threads > 1)} per rank)",
        peak_flops={"fp32": c.ceiling_flops, "bf16": c.ceiling_flops},
        memory_bytes=_memory_total(),
        memory_Bps=c.memory_Bps,
        nvlink=None,
        efficiency=c.rate_flops / c.ceiling_flops,
        source="measured by labkit.plan.calibrate on this machine",
        overhead_s=c.overhead_s,
        half_rate_width=c.half_rate_width,
    )
    return Cluster(
        card,
        n,
        gpus_per_node=n,
        shared_cores=cores,
        collectives={size: (a + extra, b) for size, (a, b) in c.collectives.items()},
        name=f"this machine: {n} process(es) on {cores} cores, Gloo",
    )


def _fit_sync(c: Calibration, n: int) -> float:
    """What a collective costs inside a training step on ``n`` processes beyond the benchmark's
    back-to-back alpha, fitted on nano runs of every kind (a relative least-squares fit; the
    model's count of collectives is the derivative of its step in the extra)."""
    from labkit.launch import run_many
    from labkit.plan.predict import predict

    configs = [TrainConfig(**{**PLAN_RUN, "model": "nano", **mesh}) for mesh in SYNC_MESHES[n]]
    num = den = 0.0
    for cfg, result in zip(configs, run_many(configs, progress=False), strict=True):
        measured = result.steady_step_s(skip=2)
        base = predict(cfg, _cluster(c, n, 0.0)).step_time_s
        calls = (predict(cfg, _cluster(c, n, 1e-3)).step_time_s - base) / 1e-3
        num += calls * (measured - base) / measured**2
        den += calls * calls / measured**2
    return max(0.0, num / den) if den else 0.0


def calibrate(
    threads: int | None = None,
    *,
    world_sizes: Sequence[int] = (2, 4),
    models: Sequence[str] = CALIBRATION_MODELS,
    backend: str = "gloo",
) -> Calibration:
    """Measure this machine: ceiling, memory bandwidth, one-process steps, all-reduces.

    ``backend="nccl"`` fits alpha and beta from NCCL all-reduces instead (on a machine with at
    least ``max(world_sizes)`` GPUs; the compute fit still measures the CPU processes).
    """
    from labkit.perf import peak_matmul_flops

    threads = threads or os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ceiling = max(peak_matmul_flops(sizes=(256, 512, 1024)).values())
        memory = _memory_bandwidth()
    finally:
        torch.set_num_threads(previous)
    steps = _step_rows(threads, models, CALIBRATION_BATCHES)
    rate, d_half, overhead = _fit_compute(steps, memory)
    allreduce = _allreduce_rows([n for n in world_sizes if n > 1], backend)
    c = Calibration(
        threads=threads,
        ceiling_flops=ceiling,
        memory_Bps=memory,
        rate_flops=rate,
        half_rate_width=d_half,
        overhead_s=overhead,
        collectives=fit_alpha_beta(allreduce),
        steps=steps,
        allreduce=allreduce,
    )
    sync = {n: _fit_sync(c, n) for n in c.collectives if n in SYNC_MESHES}
    return replace(c, sync_s=sync)


@functools.cache
def _cached(threads: int, world_sizes: tuple[int, ...]) -> Calibration:
    return calibrate(threads, world_sizes=world_sizes)


def local_cluster(n_ranks: int | None = None, calibration: Calibration | None = None) -> Cluster:
    """This machine as ``n_ranks`` "GPUs" (processes on its CPU cores, Gloo between them).

    Calibrates on first use (about half a minute; cached for the session) with the threads each
    of ``n_ranks`` processes gets, as ``labkit.run`` gives them. Pass ``calibration`` to reuse one.
    """
    cores = os.cpu_count() or 1
    n = n_ranks or cores
    threads = max(1, cores // n)
    if calibration is None:
        sizes = tuple(sorted({2, 4} | ({n} if n > 1 else set())))
        calibration = _cached(threads, sizes)
    return _cluster(calibration, n)


def _memory_total() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8e9
