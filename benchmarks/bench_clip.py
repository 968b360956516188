"""Benchmark: labkit's clip_grad_norm_ against torch.nn.utils.clip_grad_norm_(foreach=True).

Both run in the same process on the same gradients, alternating call by call (ABBA order, so
neither always goes first), and we compare medians. The result is a ratio labkit / torch,
with notes on the machine; an absolute time on its own says little on a shared machine.

    python -m benchmarks.bench_clip --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from labkit.clip import clip_grad_norm_
from labkit.perf import machine_info

__all__ = ["bench_clip", "gpt_like_shapes", "main", "run"]


def gpt_like_shapes(n_tensors: int, d_model: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style stack of blocks, cut to exactly ``n_tensors`` tensors.

    Each block has 12 tensors: two layer norms (weight, bias), the fused qkv projection, the
    attention output projection and the two MLP matrices, each with a bias. Real models mix a
    few large matrices with many small vectors, which is what stresses the per-tensor overhead.
    """
    d = d_model
    block = [
        (d,),
        (d,),  # ln_1
        (3 * d, d),
        (3 * d,),  # attention qkv
        (d, d),
        (d,),  # attention output
        (d,),
        (d,),  # ln_2
        (4 * d, d),
        (4 * d,),  # mlp up
        (d, 4 * d),
        (d,),  # mlp down
    ]
    return [block[i % len(block)] for i in range(n_tensors)]


def _make_params(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, waiting for the GPU (if any) before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bench_clip(
    n_tensors: int = 120,
    repeats: int = 50,
    d_models: Sequence[int] = (64, 256),
    norm_type: float = 2.0,
    device: str = "auto",
) -> pd.DataFrame:
    """Time both implementations on GPT-like gradients; one row per model width.

    Columns: the model size, median milliseconds for labkit and torch, ``ratio``
    (labkit / torch; below 1.05 is the target), and the machine it ran on.
    """
    dev = _resolve_device(device)
    machine = machine_info(dev)
    rows = []
    for d_model in d_models:
        params = _make_params(gpt_like_shapes(n_tensors, d_model), dev)
        # max_norm=1: the first call clips, later ones multiply by ~1. Both implementations
        # see exactly the same gradients at every call, and the work is the same either way.
        candidates = {
            "labkit": lambda params=params: clip_grad_norm_(params, 1.0, norm_type, foreach=True),
            "torch": lambda params=params: torch.nn.utils.clip_grad_norm_(
                params, 1.0, norm_type, foreach=True
            ),
        }
        for fn in candidates.values():  # warm-up: allocator, caches, lazy initialisation
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for i in range(repeats):
            order = ["labkit", "torch"] if i % 2 == 0 else ["torch", "labkit"]
            for name in order:
                times[name].append(_timed(candidates[name], dev))
        labkit_ms = 1e3 * statistics.median(times["labkit"])
        torch_ms = 1e3 * statistics.median(times["torch"])
        rows.append(
            {
                "n_tensors": n_tensors,
                "d_model": d_model,
                "n_params": sum(p.numel() for p in params),
                "norm_type": norm_type,
                "repeats": repeats,
                "labkit_ms": round(labkit_ms, 4),
                "torch_ms": round(torch_ms, 4),
                "ratio": round(labkit_ms / torch_ms, 3),
                **machine,
            }
        )
    return pd.DataFrame(rows)


def run(argv: list[str] | None = None) -> int:
    """Command-line entry (``labkit bench clip``): run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        prog="labkit bench clip", description="labkit vs torch clip_grad_norm_(foreach=True)"
    )
    parser.add_argument("--n-tensors", type=int, default=120, help="parameter tensors (>= 100)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per implementation")
    parser.add_argument(
        "--d-model", type=int, nargs="+", default=[64, 256], help="model widths to try"
    )
    parser.add_argument("--norm-type", type=float, default=2.0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = parser.parse_args(argv)

    table = bench_clip(
        n_tensors=args.n_tensors,
        repeats=args.repeats,
        d_models=args.d_model,
        norm_type=args.norm_type,
        device=args.device,
    )
    columns = ["n_tensors", "d_model", "n_params", "labkit_ms", "torch_ms", "ratio"]
    print(table[columns].to_string(index=False))
    first = table.iloc[0]
    print(
        f"\nmachine: {first['device']}, {first['platform']}, {first['cpu_count']} CPUs "
        f"({first['torch_threads']} torch threads), torch {first['torch']}"
    )
    print("target: ratio <= 1.05 (labkit time / torch time, medians of alternating calls)")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


def main() -> None:
    """``python -m benchmarks.bench_clip``."""
    sys.exit(run())


if __name__ == "__main__":
    main()
