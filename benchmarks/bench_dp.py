"""Benchmark: labkit's bucketed data parallelism against torch DDP, and DP throughput vs one process.

Three measurements, in one invocation, on 2 Gloo ranks, all with ``timeline=False`` (torch's DDP
then runs its untouched C++ path, and ours records nothing either):

1. **Interleaved steps** (the headline). Two worker processes each build *two* trainers of the
   training loop, ``dp-bucketed`` (our ``BucketedDP``) and ``ddp`` (torch's
   DistributedDataParallel), same model, batch and bucket size, and alternate their optimizer
   steps ABBA. Each ``train_step`` reports its ``step_time_s`` (the slowest rank's counts);
   after ``--skip`` warm-up steps, the median of the ratios of adjacent steps is the result.
   Adjacent steps are ~0.1 s apart, so the load of other jobs on a shared machine, which can
   halve its speed for tens of seconds, hits both sides alike. Target: ratio <= 1.05.
2. **Whole runs**: ``labkit.run`` of each, back to back, ``--repeats`` times (ABBA), median
   steady step time from ``RunResult.metrics`` per run, one ratio per repeat.
3. **Throughput**: global tokens per second of every data-parallel strategy against ``single``
   with the same total number of threads (``--threads``, split between the ranks).

    python -m benchmarks.bench_dp [--record]      # or: labkit bench dp [--record]

``--record`` writes the tables, with the machine they ran on, to ``benchmarks/results/dp-cpu.md``
(``dp-<gpu>.md`` on a GPU). On a shared machine the absolute times mean little: read the ratios,
and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import labkit
from labkit.perf import machine_info

__all__ = ["benchmark", "interleaved_steps", "main", "run", "throughput", "whole_runs"]

RESULTS = Path(__file__).resolve().parent / "results"
DP_STRATEGIES = ("dp-naive", "dp-bucketed", "ddp", "zero1", "fsdp")
PAIR = ("dp-bucketed", "ddp")  # labkit, torch


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


# ---------------------------------------------------------------------------------------------
# 1. Interleaved steps of two trainers in the same processes
# ---------------------------------------------------------------------------------------------


def _interleaved_worker(
    rank: int, world_size: int, common: dict[str, Any], steps: int
) -> list[dict[str, Any]]:
    """On each rank: a dp-bucketed and a ddp trainer, stepping alternately (ABBA)."""
    from labkit.config import TrainConfig
    from labkit.parallel.base import DistContext
    from labkit.train import Trainer

    ctx = DistContext(rank, world_size, rank, torch.device("cpu"), "gloo")
    trainers = {
        s: Trainer(TrainConfig(**common, strategy=s, world_size=world_size, steps=steps), ctx)
        for s in PAIR
    }
    rows = []
    for step in range(steps):
        order = PAIR if step % 2 == 0 else PAIR[::-1]
        for strategy in order:
            row = trainers[strategy].train_step()
            rows.append({"step": step, "strategy": strategy, "step_time_s": row["step_time_s"]})
    for trainer in trainers.values():
        trainer.strategy.close()
    return rows


def interleaved_steps(common: dict[str, Any], steps: int, skip: int) -> pd.DataFrame:
    """One row per steady step: both step times (slowest rank) and their ratio."""
    from labkit.lessons.collectives import spawn

    threads = max(1, (common.get("threads") or os.cpu_count() or 2) // 2)
    per_rank = spawn(_interleaved_worker, 2, (common, steps), timeout_s=600, threads=threads)
    frame = pd.DataFrame([row for rows in per_rank for row in rows])
    table = frame.pivot_table(index="step", columns="strategy", values="step_time_s", aggfunc="max")
    table = table[table.index >= skip][list(PAIR)].reset_index()
    table["ratio"] = table[PAIR[0]] / table[PAIR[1]]
    return table


# ---------------------------------------------------------------------------------------------
# 2. Whole runs, and 3. throughput
# ---------------------------------------------------------------------------------------------


def steady_steps(result: labkit.RunResult, skip: int) -> pd.DataFrame:
    """One row per steady step: the slowest rank's step time and the global tokens per second."""
    m = result.metrics[result.metrics["step"] >= skip]
    per_step = m.groupby("step").agg(
        step_time_s=("step_time_s", "max"), global_tokens_per_s=("global_tokens_per_s", "min")
    )
    return per_step.reset_index()


def _run(strategy: str, common: dict[str, Any]) -> labkit.RunResult:
    world = 1 if strategy == "single" else 2
    try:
        return labkit.run(**common, strategy=strategy, world_size=world)
    except labkit.WorkerError as err:
        # One retry: on a loaded machine a worker occasionally aborts in the C++ teardown after
        # its work is done; a benchmark of many runs should not be lost to that.
        print(f"note: a {strategy} run failed ({err.detail}); running it again", file=sys.stderr)
        return labkit.run(**common, strategy=strategy, world_size=world)


def whole_runs(
    common: dict[str, Any], repeats: int, skip: int
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """``labkit.run`` of dp-bucketed and ddp, ABBA; one row per run, plus every run's steps."""
    rows: list[dict[str, Any]] = []
    steps: dict[str, list[pd.DataFrame]] = {s: [] for s in PAIR}
    for i in range(repeats):
        for strategy in PAIR if i % 2 == 0 else PAIR[::-1]:
            per_step = steady_steps(_run(strategy, common), skip)
            steps[strategy].append(per_step)
            rows.append(
                {
                    "repeat": i,
                    "strategy": strategy,
                    "median_step_s": per_step["step_time_s"].median(),
                    "steps": len(per_step),
                }
            )
    runs = pd.DataFrame(rows)
    pivot = runs.pivot(index="repeat", columns="strategy", values="median_step_s")
    runs["repeat_ratio"] = runs["repeat"].map(pivot[PAIR[0]] / pivot[PAIR[1]])
    return runs, {k: pd.concat(v) for k, v in steps.items()}


def throughput(
    common: dict[str, Any],
    skip: int,
    strategies: tuple[str, ...] = DP_STRATEGIES,
    known: dict[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Median global tokens/s of ``single`` and each strategy (``known``: steps already run)."""
    known = dict(known or {})
    rows = []
    for strategy in ("single", *strategies):
        if strategy not in known:
            known[strategy] = steady_steps(_run(strategy, common), skip)
        per_step = known[strategy]
        rows.append(
            {
                "strategy": strategy,
                "ranks": 1 if strategy == "single" else 2,
                "median_step_s": per_step["step_time_s"].median(),
                "tokens_per_s": per_step["global_tokens_per_s"].median(),
            }
        )
    table = pd.DataFrame(rows)
    table["vs_single"] = table["tokens_per_s"] / table.loc[0, "tokens_per_s"]
    return table


def benchmark(
    model: str = "small",
    steps: int = 10,
    interleaved: int = 30,
    skip: int = 3,
    repeats: int = 2,
    global_batch_size: int = 16,
    bucket_mb: float = 25.0,
    threads: int = 2,
) -> dict[str, Any]:
    """All three measurements; returns the tables, the ratios and the settings."""
    common = dict(
        model=model,
        global_batch_size=global_batch_size,
        bucket_mb=bucket_mb,
        threads=threads,
        progress=False,
        timeline=False,
    )
    paired = interleaved_steps(common, interleaved, skip)
    runs, steps_by_strategy = whole_runs({**common, "steps": steps}, repeats, skip)
    table = throughput({**common, "steps": steps}, skip, known=steps_by_strategy)
    return {
        "ratio": float(paired["ratio"].median()),
        "ratio_of_medians": float(paired[PAIR[0]].median() / paired[PAIR[1]].median()),
        "labkit_step_s": float(paired[PAIR[0]].median()),
        "torch_step_s": float(paired[PAIR[1]].median()),
        "run_ratio": float(runs.drop_duplicates("repeat")["repeat_ratio"].median()),
        "paired": paired,
        "runs": runs,
        "throughput": table,
        "settings": {
            **common,
            "steps": steps,
            "interleaved": interleaved,
            "skip": skip,
            "repeats": repeats,
        },
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a Markdown table (pandas' own needs the optional ``tabulate``)."""

    def cell(value: Any) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _summary(out: dict[str, Any]) -> str:
    return (
        f"dp-bucketed / ddp step time: {out['ratio']:.3f} (median ratio of adjacent interleaved "
        f"steps; target <= 1.05). Medians {out['labkit_step_s'] * 1e3:.1f} ms vs "
        f"{out['torch_step_s'] * 1e3:.1f} ms (ratio {out['ratio_of_medians']:.3f}); "
        f"whole runs back to back: {out['run_ratio']:.3f}."
    )


def _markdown(out: dict[str, Any], info: dict[str, str]) -> str:
    s = out["settings"]
    lines = [
        "# Data parallelism on CPU: labkit dp-bucketed vs torch DDP",
        "",
        f"Model `{s['model']}`, global batch {s['global_batch_size']}, bucket {s['bucket_mb']} "
        f"MiB, 2 Gloo ranks, {s['threads']} threads in total, timeline off, first {s['skip']} "
        "steps left out. `python -m benchmarks.bench_dp --record`.",
        "",
        f"**{_summary(out)}**",
        "",
        f"## Interleaved steps ({s['interleaved']} steps of each, ABBA, in the same processes)",
        "",
        _table(out["paired"]),
        "",
        f"## Whole runs ({s['steps']} steps each, back to back, ABBA)",
        "",
        _table(out["runs"]),
        "",
        "## Throughput against one process with the same threads",
        "",
        _table(out["throughput"], 3),
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Command-line entry (``labkit bench dp``): run, print, optionally record."""
    parser = argparse.ArgumentParser(
        prog="labkit bench dp", description="labkit dp-bucketed vs torch DDP, and DP throughput"
    )
    parser.add_argument("--model", default="small", help="model preset (default: small)")
    parser.add_argument("--steps", type=int, default=10, help="steps per whole run")
    parser.add_argument("--interleaved", type=int, default=30, help="interleaved steps of each")
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of medians")
    parser.add_argument("--repeats", type=int, default=2, help="whole runs of each of the two")
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total")
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/dp-*.md")
    args = parser.parse_args(argv)

    info = machine_info()
    out = benchmark(
        model=args.model,
        steps=args.steps,
        interleaved=args.interleaved,
        skip=args.skip,
        repeats=args.repeats,
        global_batch_size=args.global_batch_size,
        bucket_mb=args.bucket_mb,
        threads=args.threads,
    )
    info["load average (1, 5, 15 min) at end"] = _load()
    print(out["runs"].to_string(index=False))
    print()
    print(out["throughput"].to_string(index=False))
    print("\n" + _summary(out))
    print("\n" + ", ".join(f"{k}: {v}" for k, v in info.items()))
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "cpu" if info["device"] == "cpu" else info["device"].replace(" ", "-").lower()
        path = RESULTS / f"dp-{name}.md"
        path.write_text(_markdown(out, info))
        print(f"recorded in {path}")
    return 0


def main() -> None:
    """``python -m benchmarks.bench_dp``."""
    sys.exit(run())


if __name__ == "__main__":
    main()
