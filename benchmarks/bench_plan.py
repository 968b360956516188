"""Benchmark: the planner's predictions against what this machine measures, and published runs.

1. Calibrate (``labkit.plan.calibrate``): the matmul ceiling, one-process steps of nano, micro
   and small, Gloo all-reduces on 2, 4 and 8 processes, and a nano data-parallel step per
   world size (what a collective costs inside a step).
2. Predict, then run, every strategy and mesh in ``labkit.lessons.planner.LOCAL_MESHES`` on
   1-8 processes, for two model sizes: step time (slowest rank, median of the steady steps) and
   peak memory (fullest rank). Median and worst absolute errors per model.
3. ``labkit.plan.published.sanity_table``: predicted / published for torchtitan, picotron and
   Megatron-LM runs.

    python -m benchmarks.bench_plan [--record]      # or: labkit bench plan [--record]

``--record`` writes ``benchmarks/results/plan-<device>.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from labkit import plan
from labkit.lessons.planner import PLAN_RUN, check_against_runs, error_summary
from labkit.perf import machine_info
from labkit.plan.published import sanity_table

RESULTS = Path(__file__).resolve().parent / "results"


def _markdown(frame: pd.DataFrame, floats: str = "{:.3g}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [floats.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Command-line entry (``labkit bench plan``)."""
    parser = argparse.ArgumentParser(prog="labkit bench plan", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["micro", "small"])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cores = os.cpu_count() or 1
    sizes = tuple(n for n in args.world_sizes if n > 1)
    calibrations = {t: plan.calibrate(t, world_sizes=sizes) for t in {1, cores}}

    def cluster_for(n: int) -> plan.Cluster:
        return plan.local_cluster(n, calibrations[max(1, cores // n)])

    table = check_against_runs(args.models, args.world_sizes, cluster_for=cluster_for)
    summary = error_summary(table)
    sanity = sanity_table()
    elapsed = time.perf_counter() - start
    pd.set_option("display.width", 200)
    print(table.round(3).to_string(index=False))
    print(summary.round(3).to_string())
    print(sanity.drop(columns=["source", "assumed"]).round(3).to_string(index=False))

    if args.record:
        info = machine_info("cpu")
        cal_rows = []
        for threads, c in sorted(calibrations.items()):
            cal_rows.append(
                {
                    "threads per rank": threads,
                    "matmul ceiling (GFLOP/s)": c.ceiling_flops / 1e9,
                    "fitted rate R (GFLOP/s)": c.rate_flops / 1e9,
                    "half-rate width d_half": c.half_rate_width,
                    "overhead per layer (ms)": 1e3 * c.overhead_s,
                    "memory (GB/s)": c.memory_Bps / 1e9,
                }
            )
        c1 = calibrations[1]
        ab = pd.DataFrame(
            [
                {
                    "processes": n,
                    "alpha (ms)": 1e3 * a,
                    "bus bandwidth 1/beta (GB/s)": (1 / b / 1e9) if b else float("inf"),
                    "in-step extra per collective (ms)": 1e3 * c1.sync_s.get(n, 0.0),
                }
                for n, (a, b) in sorted(c1.collectives.items())
            ]
        )
        shown = table.copy()
        for col in ("step_error", "memory_error"):
            shown[col] = shown[col].map(lambda v: f"{v:+.0%}")
        lines = [
            "# The planner against this machine (cpu) and against published runs",
            "",
            "Command: `python -m benchmarks.bench_plan " + " ".join(sys.argv[1:]) + "`"
            f" ({elapsed:.0f} s)",
            "",
            "| machine | |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in info.items()),
            "",
            "## Calibration (measured, then fitted)",
            "",
            _markdown(pd.DataFrame(cal_rows)),
            "",
            _markdown(ab),
            "",
            "## Predicted against measured, every local strategy and mesh",
            "",
            f"Runs: {PLAN_RUN | {'model': '<below>'}}. Step: slowest rank's median of steps "
            "2-5. Memory: the fullest rank's parameters, gradients, optimizer state and saved "
            "activations (`RunResult.memory`), beside the planner's same accounting.",
            "",
            _markdown(summary.reset_index(), "{:.1%}"),
            "",
            _markdown(shown.round(2), "{:.2f}"),
            "",
            "## Predicted against published runs",
            "",
            _markdown(sanity.round(3)),
            "",
        ]
        RESULTS.mkdir(exist_ok=True)
        table.to_csv(RESULTS / "plan-cpu.csv", index=False)  # notebook 09 reads it
        out = RESULTS / "plan-cpu.md"
        out.write_text("\n".join(lines))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
