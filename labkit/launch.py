"""Training runs on several processes: ``labkit.run``, ``run_many`` and the torchrun entry.

From a notebook cell, a script or the command line, ``run(strategy="ddp", world_size=2)`` starts
two real worker processes through ``labkit.supervisor`` (fresh interpreters, a private
rendezvous, failures named by rank, nothing left behind) and gathers their results into one
``RunResult``. Everything is checked before a process starts (``labkit.preflight``). Under
``torchrun`` the same per-rank code runs through ``run_under_torchrun``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from labkit.config import TrainConfig, make_config
from labkit.parallel.base import DistContext
from labkit.preflight import preflight
from labkit.progress import Progress
from labkit.result import RunResult
from labkit.supervisor import (
    Counter,
    WorkerError,
    close_pool,
    keep_workers,
    run_on_workers,
    spawn,
    spawn_with_logs,
)
from labkit.train import Trainer, shared_clock, train

__all__ = [
    "WorkerError",
    "close_pool",
    "keep_workers",
    "launch",
    "resolve_device",
    "run",
    "run_many",
    "run_single",
    "run_under_torchrun",
    "spawn",
    "spawn_with_logs",
]


def resolve_device(cfg: TrainConfig) -> tuple[str, str]:
    """(device type, backend) for ``cfg``: CUDA + NCCL when GPUs are present, else CPU + Gloo."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.backend != "auto":
        backend = cfg.backend
    else:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda and cfg.world_size > torch.cuda.device_count() and cfg.strategy != "single":
        # NCCL refuses two ranks on one GPU. Asked for CUDA: say so before launch. On "auto":
        # run on CPU processes with Gloo instead, and say that too.
        n = torch.cuda.device_count()
        if cfg.device == "cuda":
            raise ValueError(
                f"TrainConfig.world_size={cfg.world_size} is invalid: only {n} GPU(s) visible "
                "and NCCL runs one rank per GPU; use world_size <= the GPUs or device='cpu'"
            )
        warnings.warn(
            f"world_size={cfg.world_size} but only {n} GPU(s) visible (NCCL runs one rank per "
            "GPU): this run uses CPU processes with Gloo",
            stacklevel=3,
        )
        use_cuda, backend = False, "gloo" if cfg.backend == "auto" else backend
    return ("cuda" if use_cuda else "cpu"), backend


def threads_per_rank(cfg: TrainConfig) -> int:
    """CPU threads for each rank: the total (``cfg.threads`` or all cores) split evenly."""
    total = cfg.threads or os.cpu_count() or 1
    return max(1, total // cfg.world_size)


def run_rank(cfg: TrainConfig, ctx: DistContext, on_step: Any = None) -> dict[str, Any] | None:
    """Train on this rank and gather every rank's rows to rank 0 (which returns them)."""
    t0 = shared_clock(ctx)
    out = train(cfg, ctx, on_step=on_step, t0=t0)
    payload = (
        out.metrics,
        out.timeline,
        out.layer_norms,
        out.memory,
        out.trace_file,
        out.collectives,
    )
    gathered: list[Any] = [None] * ctx.world_size if ctx.rank == 0 else []
    dist.gather_object(payload, gathered if ctx.rank == 0 else None, dst=0)
    if ctx.rank != 0:
        return None
    return {
        "metrics": [row for m, *_ in gathered for row in m],
        "timeline": [row for _, t, *_ in gathered for row in t],
        "layer_norms": [row for _, _, n, *_ in gathered for row in n],
        "memory": [part[3] for part in gathered],
        "trace_files": [part[4] for part in gathered if part[4]],
        "collectives": [row for part in gathered for row in part[5]],
        "info": out.info,
        "state": out.state,
    }


def _train_worker(
    rank: int, world_size: int, configs: list[TrainConfig], device_type: str, progress: Any
) -> list[dict[str, Any]] | None:
    """The per-rank body of training runs: train each config in turn, gathering to rank 0."""
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    ctx = DistContext(rank, world_size, rank, device, dist.get_backend())
    payloads, done = [], 0
    for cfg in configs:

        def on_step(step: int, before: int = done) -> None:
            if rank == 0:
                progress.value = before + step

        payloads.append(run_rank(cfg, ctx, on_step))
        done += cfg.stop_after or cfg.steps
    return payloads if rank == 0 else None


def run_many(
    configs: Sequence[TrainConfig], *, progress: bool = True, desc: str | None = None
) -> list[RunResult]:
    """Train several multi-process configs one after another in the same worker processes.

    Each result is what ``labkit.run(cfg)`` returns for that config, but the process start-up
    (spawn, imports, rendezvous: seconds on a laptop) is paid once: notebooks that compare
    strategies use this. All configs must share ``world_size`` and device; every config is
    validated before a process starts.
    """
    configs = list(configs)
    if not configs:
        return []
    devices = {resolve_device(c) for c in configs}
    if len({c.world_size for c in configs}) > 1 or len(devices) > 1:
        raise ValueError("run_many: all configs must share world_size, device and backend")
    if any(c.strategy == "single" for c in configs):
        raise ValueError("run_many runs multi-process strategies; use labkit.run for 'single'")
    for cfg in configs:
        preflight(cfg)
    return _launch_many(configs, devices.pop(), progress=progress, desc=desc)


def _launch_many(
    configs: list[TrainConfig],
    device: tuple[str, str],
    *,
    progress: bool,
    desc: str | None = None,
) -> list[RunResult]:
    """``run_many`` after its checks: start the workers, show progress, gather the results."""
    first = configs[0]
    device_type, backend = device
    counter = Counter()  # rank 0 writes its step count here
    bar = Progress(
        sum(c.stop_after or c.steps for c in configs),
        desc or " + ".join(c.label for c in configs),
        disable=not progress,
    )

    def show_progress() -> None:
        bar.update_to(counter.value)

    try:
        results, logs = run_on_workers(
            _train_worker,
            first.world_size,
            (configs, device_type, counter),
            backend=backend,
            timeout_s=first.timeout_s,
            threads=threads_per_rank(first),
            on_poll=show_progress,
        )
    finally:
        bar.close()
    out = []
    for cfg, payload in zip(configs, results[0], strict=True):
        info = dict(payload["info"], backend=backend, world_size=cfg.world_size)
        out.append(RunResult.from_ranks(cfg, payload, info, logs))
    return out


def launch(cfg: TrainConfig) -> RunResult:
    """Run ``cfg`` on ``cfg.world_size`` spawned worker processes and gather a RunResult."""
    return _launch_many([cfg], resolve_device(cfg), progress=cfg.progress)[0]


def run_single(
    cfg: TrainConfig, on_step: Callable[[int, list[dict[str, Any]]], None] | None = None
) -> RunResult:
    """Train ``strategy="single"`` in this process, with a progress bar.

    ``on_step(step, metrics)`` is called after every optimizer step with the rows so far (a live
    plot uses it).
    """
    device_type, _ = resolve_device(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bar = Progress(cfg.stop_after or cfg.steps, "single", disable=not cfg.progress)
    t_start = time.perf_counter()
    try:
        trainer = Trainer(cfg, DistContext(device=torch.device(device_type)))

        def step_done(step: int) -> None:
            bar.update_to(step)
            if on_step is not None:
                on_step(step, trainer.metrics)

        out = trainer.fit(step_done)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    info = dict(out.info, backend=None, world_size=1, wall_s=time.perf_counter() - t_start)
    payload = {
        "metrics": out.metrics,
        "timeline": out.timeline,
        "layer_norms": out.layer_norms,
        "memory": [out.memory],
        "trace_files": [out.trace_file] if out.trace_file else [],
        "collectives": out.collectives,
        "state": out.state,
    }
    return RunResult.from_ranks(cfg, payload, info)


def run(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train with ``config`` (and/or keyword overrides) and return a RunResult.

    ``strategy="single"`` trains in this process; any other strategy starts ``world_size`` worker
    processes and gathers their results. Everything is validated before a process starts.
    """
    cfg = make_config(config, **overrides)
    resolve_device(cfg)  # raises on an impossible device request before anything starts
    preflight(cfg)
    t_start = time.perf_counter()
    result = run_single(cfg) if cfg.strategy == "single" else launch(cfg)
    result.info["wall_s"] = time.perf_counter() - t_start
    warn_if_nothing_trained(result)
    return result


def warn_if_nothing_trained(result: RunResult) -> None:
    """A run whose every step was skipped for non-finite gradients did not train: say so."""
    skipped, ran = result.info.get("skipped_steps", 0), result.metrics["step"].nunique()
    if ran and skipped >= ran:
        warnings.warn(
            f"every one of the {ran} steps was skipped for a non-finite gradient norm: the model "
            "did not train (lower lr, turn on clipping, or use nonfinite='raise' to stop at once)",
            stacklevel=3,
        )


def run_under_torchrun(cfg: TrainConfig) -> RunResult | None:
    """The per-rank entry when ``torchrun`` started this process (env:// rendezvous).

    Works on one node or many: ``torchrun --nnodes 2 --nproc-per-node 8 ... -m labkit train ...``.
    Returns the RunResult on global rank 0 and None elsewhere.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != cfg.world_size:
        cfg = cfg.replace(world_size=world)
    if rank == 0:  # one rank checks the shared paths; a failure here stops the whole job
        preflight(cfg)
    device_type, backend = resolve_device(cfg)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    ctx = DistContext(rank, world, local_rank, device, backend)
    t_start = time.perf_counter()
    try:
        payload = run_rank(cfg, ctx)
    finally:
        dist.destroy_process_group()
    if payload is None:
        return None
    info = dict(payload["info"], backend=backend, world_size=world)
    info["wall_s"] = time.perf_counter() - t_start
    return RunResult.from_ranks(cfg, payload, info)
