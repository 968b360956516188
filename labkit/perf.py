"""Measuring the machine: its matrix-multiply ceiling (for MFU) and a description for benchmarks.

Model FLOP utilisation (MFU) is achieved FLOP/s divided by what the hardware can do. A datasheet
number is a guess on a laptop (turbo clocks, thread count, BLAS build), so labkit *measures* the
ceiling: the best FLOP/s of large float32 matrix multiplies on this device.
"""

from __future__ import annotations

import os
import platform
import time

import torch


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
