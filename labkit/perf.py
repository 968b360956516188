"""Measuring the machine: its matrix-multiply ceiling (for MFU) and a description for benchmarks.

Model FLOP utilisation (MFU) is achieved FLOP/s divided by what the hardware can do. A datasheet
number is a guess on a laptop (turbo clocks, thread count, BLAS build), so labkit *measures* the
ceiling: the best FLOP/s of large float32 matrix multiplies on this device.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def machine_info(device: str | torch.device = "cpu") -> dict[str, str | int]:
    """What a benchmark ran on: device (the GPU's name), platform, cores, threads, versions, load."""
    device = torch.device(device)
    info: dict[str, str | int] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):  # a shared, loaded machine reads very differently
        info["load average (1, 5, 15 min)"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(
    n: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
) -> float:
    """Best FLOP/s of ``repeats`` timed ``n x n @ n x n`` products (2 n^3 FLOPs each)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel selection
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_matmul_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    sizes: tuple[int, ...] = (256, 512, 1024),
    repeats: int = 5,
) -> dict[int, float]:
    """FLOP/s at each matrix size; the maximum is this device's measured ceiling."""
    return {n: matmul_flops(n, device=device, dtype=dtype, repeats=repeats) for n in sizes}


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: the fraction of the measured ceiling a run achieved."""
    return achieved_flops_per_s / peak_flops_per_s


# Collectives: timing one the way nccl-tests does (labkit.lessons.collectives, labkit.plan).


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: ``algbw * 2 (n - 1) / n``.

    Each rank of a ring sends (and receives) ``2 (n - 1) / n`` bytes per byte of the tensor, so
    this is the speed the links actually ran at, comparable across world sizes.
    """
    return algbw * 2 * (world_size - 1) / world_size


def collective_device(group: ProcessGroup | None) -> torch.device:
    """Where a collective's tensors must live: CUDA for NCCL, CPU for Gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def time_per_call(
    fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    iters: int,
    warmup: int,
    group: ProcessGroup | None,
) -> float:
    """Seconds per call of ``fn(x)``: the slowest rank's mean, identical on every rank."""
    for _ in range(warmup):
        fn(x)
    dist.barrier(group=group)  # everyone starts the clock together
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    # A collective is as slow as its slowest participant.
    elapsed = elapsed.to(x.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed)


def allreduce_times(
    sizes_bytes: Sequence[int], iters: int = 10, group: ProcessGroup | None = None, warmup: int = 2
) -> list[dict[str, Any]]:
    """Seconds per ``dist.all_reduce`` of float32 zeros of each size (slowest rank's mean).

    Call it on every rank of ``group``. One row per size: ``size_bytes``, ``world_size``,
    ``time_s``.
    """
    n = dist.get_world_size(group)
    device = collective_device(group)
    rows = []
    for size in sizes_bytes:
        x = torch.zeros(max(1, int(size) // 4), device=device)
        seconds = time_per_call(lambda t: dist.all_reduce(t, group=group), x, iters, warmup, group)
        rows.append({"size_bytes": x.numel() * 4, "world_size": n, "time_s": seconds})
    return rows
