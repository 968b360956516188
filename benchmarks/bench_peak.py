"""Benchmark: this machine's matrix-multiply ceiling, and the MFU of a short training run.

labkit bench peak            # CPU (or the GPU when one is present)
labkit bench peak --sizes 512 1024 2048 --model small
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

import labkit
from labkit.perf import machine_info, mfu, peak_matmul_flops


def bench_peak(sizes: tuple[int, ...], model: str, steps: int, device: str) -> pd.DataFrame:
    """Measured FLOP/s per matrix size, and the achieved FLOP/s and MFU of a training run."""
    peaks = peak_matmul_flops(device=device, sizes=sizes)
    peak = max(peaks.values())
    rows = [{"what": f"matmul {n}x{n}", "gflops_per_s": f / 1e9} for n, f in peaks.items()]
    result = labkit.run(model=model, steps=steps, device=device, progress=False)
    steady = result.metrics[result.metrics["step"] >= 2]
    achieved = float(steady["flops_per_s"].median())
    rows.append(
        {
            "what": f"train {model} (median step)",
            "gflops_per_s": achieved / 1e9,
            "mfu": mfu(achieved, peak),
        }
    )
    return pd.DataFrame(rows)


def run(argv: list[str] | None = None) -> int:
    """Command-line entry (``labkit bench peak``)."""
    parser = argparse.ArgumentParser(prog="labkit bench peak", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    table = bench_peak(tuple(args.sizes), args.model, args.steps, args.device)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("machine:", machine_info(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
