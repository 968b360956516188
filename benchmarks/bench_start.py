"""Benchmark: what a repeated multi-process run costs with the warm worker pool and without.

A widget's Train button runs the same small job again and again. Without the pool every click
starts fresh interpreters (imports, rendezvous: seconds); with it (``keep_workers``, the default
in Jupyter) only the first does. Measured side by side in one run, alternating: the wall time of
``labkit.run`` for a 2-rank nano run of 5 steps, fresh workers vs warm ones, and the ratio of a
repeated pooled run to the first (pool-building) one.

    python -m benchmarks.bench_start [--record]      # or: labkit bench start [--record]

``--record`` writes the table, with the machine, to ``benchmarks/results/start-cpu.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import labkit
from labkit.launch import close_pool, keep_workers
from labkit.perf import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def _wall(cfg: dict) -> float:
    start = time.perf_counter()
    labkit.run(**cfg)
    return time.perf_counter() - start


def measure(cfg: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times: fresh runs, first pooled runs (pool start) and repeated pooled runs."""
    out: dict[str, list[float]] = {"fresh": [], "pool_first": [], "pool_repeat": []}
    for i in range(repeats):
        keep_workers(False)
        out["fresh"].append(_wall(cfg))
        keep_workers(True)
        out["pool_first"].append(_wall(cfg))
        out["pool_repeat"] += [_wall(cfg) for _ in range(3)]
        close_pool()
        print(
            f"  repeat {i}: fresh {out['fresh'][-1]:.2f} s, pool first {out['pool_first'][-1]:.2f} s,"
            f" pool repeat {statistics.median(out['pool_repeat'][-3:]):.2f} s"
        )
    keep_workers(None)
    return out


def to_markdown(args: argparse.Namespace, cfg: dict, times: dict[str, list[float]]) -> str:
    """The report: machine, config and the side-by-side table."""
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Repeated multi-process runs: warm worker pool vs fresh workers",
        "",
        "Command: `python -m benchmarks.bench_start " + " ".join(args.argv) + "`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine_info().items()),
        "",
        f"Config: {', '.join(f'{k}={v}' for k, v in cfg.items() if k != 'progress')}. "
        f"{args.repeats} repeats, alternating; wall time of `labkit.run`, medians.",
        "",
        "| run | median wall (s) | min (s) | max (s) | runs |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {len(v)} |"
            for k, v in times.items()
        ),
        "",
        f"Repeated pooled run / first pooled run: **{med['pool_repeat'] / med['pool_first']:.3f}** "
        "(target <= 0.25).",
        f"Repeated pooled run / fresh run: {med['pool_repeat'] / med['fresh']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Entry point of ``labkit bench start``."""
    parser = argparse.ArgumentParser(prog="labkit bench start")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv or [])
    cfg = dict(model="nano", strategy="ddp", world_size=2, steps=5, progress=False)
    report = to_markdown(args, cfg, measure(cfg, args.repeats))
    print(report)
    if args.record:
        (RESULTS / "start-cpu.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
