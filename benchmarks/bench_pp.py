"""Benchmark: labkit's hand-written pipeline schedules against torch.distributed.pipelining.

Three measurements, in one invocation:

1. Step time of each hand-written schedule that torch ships a twin of, against the twin driving
   the same stages: ``1f1b`` vs ``torch-1f1b`` (``Schedule1F1B``) and ``interleaved-1f1b`` vs
   ``torch-interleaved-1f1b`` (``ScheduleInterleaved1F1B``, v = 2 chunks per rank). Run
   alternately ``--repeats`` times each (ABAB, so neither always goes first), compared by their
   fastest steady step (noise only adds time), with the median alongside.
   Target: ratio ours / torch <= 1.05.
2. The pipeline bubble of ``pp-1f1b`` measured from the timeline, against the theory
   ``(p - 1) / (m + p - 1)``, for m in {1, 2, 4, 8} micro-batches of a fixed global batch.
3. The schedules side by side at equal m: gpipe, 1f1b, interleaved-1f1b (v = 2) and zb-h1,
   each's measured bubble beside its formula (``pp_orders.bubble_formula``; zb-h1's with the
   measured F, B and W times), and its step time. zb-h1 has no exact twin in torch (torch's
   zero-bubble schedules, ``ScheduleInterleavedZeroBubble`` and ``ScheduleZBVZeroBubble``, hold
   two or more chunks per rank), so no ratio is measured for it.

    python -m benchmarks.bench_pp [--record]      # or: labkit bench pp [--record]

``--record`` writes the tables, with the machine they ran on, to ``benchmarks/results/pp-<device>.md``.
On a shared machine the absolute times mean little: read the ratio, and the load average.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import labkit
from labkit.lessons.pipeline_timeline import bubble_fraction, peak_activations
from labkit.parallel.pp_orders import bubble_formula
from labkit.perf import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
# Each hand-written schedule with a torch twin: (ours, torch's, extra fields).
TWINS = {
    "1F1B": ("1f1b", "torch-1f1b", {}),
    "interleaved 1F1B, v=2": (
        "interleaved-1f1b",
        "torch-interleaved-1f1b",
        {"pp_virtual_stages": 2},
    ),
}


def steady_step_times(result: labkit.RunResult) -> list[float]:
    """Step time of each step after the first (the slowest rank's), in seconds."""
    m = result.metrics
    per_step = m[m["step"] >= 1].groupby("step")["step_time_s"].max()
    return per_step.tolist()


def compare_with_torch(common: dict, micro_batches: int, repeats: int) -> list[dict]:
    """Alternate each schedule and its torch twin; one row per run with its step times."""
    rows = []
    mesh = {**common, "strategy": "mesh", "pp": common["world_size"]}
    for i in range(repeats):
        for pair, (ours, theirs, extra) in TWINS.items():
            for schedule in (ours, theirs):
                result = labkit.run(
                    **mesh, pp_schedule=schedule, micro_batches=micro_batches, **extra
                )
                times = steady_step_times(result)
                rows.append(
                    {
                        "repeat": i,
                        "pair": pair,
                        "schedule": schedule,
                        "torch": schedule == theirs,
                        "times": times,
                        "median_step_s": statistics.median(times),
                    }
                )
                print(f"  {schedule} run {i}: median step {rows[-1]['median_step_s'] * 1e3:.1f} ms")
    return rows


def twin_ratios(runs: list[dict]) -> list[dict]:
    """Per pair: fastest and median steady step of ours and torch's, and their ratios."""
    out = []
    for pair, (ours, theirs, _) in TWINS.items():
        pooled = {
            side: [t for r in runs if r["pair"] == pair and r["torch"] is side for t in r["times"]]
            for side in (False, True)
        }
        out.append(
            {
                "pair": pair,
                "ours": ours,
                "theirs": theirs,
                "ours_best": min(pooled[False]),
                "theirs_best": min(pooled[True]),
                "best_ratio": min(pooled[False]) / min(pooled[True]),
                "median_ratio": statistics.median(pooled[False]) / statistics.median(pooled[True]),
                "ours_runs": [
                    r["median_step_s"] for r in runs if r["pair"] == pair and not r["torch"]
                ],
                "theirs_runs": [
                    r["median_step_s"] for r in runs if r["pair"] == pair and r["torch"]
                ],
            }
        )
    return out


def bubble_table(common: dict, micro_batches: list[int]) -> list[dict]:
    """pp-1f1b with m micro-batches: the measured bubble per rank and the theory."""
    rows = []
    for m in micro_batches:
        result = labkit.run(**common, strategy="pp-1f1b", micro_batches=m)
        bubble = bubble_fraction(result.timeline)
        peak = peak_activations(result.timeline)
        rows.append(
            {
                "m": m,
                "theory": float(bubble["theory"].iloc[0]),
                "measured": float(bubble["bubble"].mean()),
                "per_rank": [round(float(b), 3) for b in bubble["bubble"]],
                "peak": peak["peak"].tolist(),
                "step_s": statistics.median(steady_step_times(result)),
            }
        )
        print(f"  m={m}: bubble {rows[-1]['measured']:.3f} (theory {rows[-1]['theory']:.3f})")
    return rows


SCHEDULES = {
    "gpipe": {},
    "1f1b": {},
    "interleaved-1f1b": {"pp_virtual_stages": 2},
    "zb-h1": {},
}


def schedules_table(common: dict, micro_batches: int, repeats: int) -> list[dict]:
    """Every hand-written schedule at the same m: measured bubble, formula, step time.

    Runs alternate schedule by schedule ``repeats`` times; a schedule's bubble is the mean over
    its runs and ranks, its step time the median of all its steady steps.
    """
    measured: dict[str, dict[str, list[float]]] = {
        s: {"bubble": [], "times": [], "formula": []} for s in SCHEDULES
    }
    for _ in range(repeats):
        for name, extra in SCHEDULES.items():
            result = labkit.run(
                **{**common, "strategy": "mesh", "pp": common["world_size"]},
                pp_schedule=name,
                micro_batches=micro_batches,
                **extra,
            )
            tl = result.timeline
            bubble = bubble_fraction(tl, micro_batches=micro_batches)
            cost = (tl["end_s"] - tl["start_s"]).groupby(tl["phase"]).mean()
            v = extra.get("pp_virtual_stages", 1)
            formula = bubble_formula(
                name,
                micro_batches,
                common["world_size"],
                v,
                forward=cost.get("forward", 1.0),
                backward=cost.get("backward", 1.0),
                weight=cost.get("weight", 0.0),
            )
            measured[name]["bubble"].append(float(bubble["bubble"].mean()))
            measured[name]["times"] += steady_step_times(result)
            measured[name]["formula"].append(formula)
    rows = []
    for name, got in measured.items():
        rows.append(
            {
                "schedule": name + (" (v=2)" if SCHEDULES[name] else ""),
                "formula": statistics.mean(got["formula"]),
                "measured": statistics.mean(got["bubble"]),
                "spread": max(got["bubble"]) - min(got["bubble"]),
                "step_s": statistics.median(got["times"]),
            }
        )
        print(f"  {name}: bubble {rows[-1]['measured']:.3f} (formula {rows[-1]['formula']:.3f})")
    return rows


def to_markdown(
    args: argparse.Namespace,
    info: dict[str, str],
    device: str,
    runs: list[dict],
    bubbles: list,
    schedules: list[dict],
) -> str:
    """The report: machine, config, the step-time comparison and the bubble table."""
    # Every steady step of every run, pooled. Noise on a shared machine only ever adds time, so
    # the fastest step of each is the estimate of its own cost (timeit's rule); the median of
    # all steps is shown next to it.
    ratios = twin_ratios(runs)
    lines = [
        f"# Pipeline parallelism on {device}: labkit's schedules vs torch.distributed.pipelining",
        "",
        "Command: `python -m benchmarks.bench_pp " + " ".join(args.argv) + "`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"Config: model={args.model}, world_size={args.world_size}, global_batch_size="
        f"{args.global_batch_size}, steps={args.steps} (step 0 left out), pp_balance="
        f"{args.pp_balance}, threads={args.threads} in total.",
        "",
    ]
    for r in ratios:
        lines += [
            f"## Step time, {r['pair']}: `{r['ours']}` vs torch's `{r['theirs']}`, "
            f"m={args.micro_batches}",
            "",
            f"| repeat | labkit {r['ours']}, median step (ms) | torch {r['theirs']}, median step (ms) |",
            "|---|---|---|",
            *(
                f"| {i} | {a * 1e3:.1f} | {b * 1e3:.1f} |"
                for i, (a, b) in enumerate(zip(r["ours_runs"], r["theirs_runs"], strict=True))
            ),
            "",
            f"Fastest step: labkit {r['ours_best'] * 1e3:.1f} ms, torch "
            f"{r['theirs_best'] * 1e3:.1f} ms.",
            "",
            f"**Ratio labkit / torch, fastest step: {r['best_ratio']:.3f}** (target <= 1.05); "
            f"median over all steps: {r['median_ratio']:.3f}",
            "",
        ]
    lines += [
        "## Bubble of pp-1f1b: measured vs theory (p - 1) / (m + p - 1)",
        "",
        "Measured = 1 - (forward + backward time) / (pipeline span), averaged over ranks; the",
        "span runs from the first forward to the last backward of a step. Peak = most",
        "micro-batches a stage held activations for (1F1B: at most p - stage).",
        "",
        "| m | theory | measured | per rank | peak activations | median step (ms) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {b['m']} | {b['theory']:.3f} | {b['measured']:.3f} | {b['per_rank']} | "
            f"{b['peak']} | {b['step_s'] * 1e3:.1f} |"
            for b in bubbles
        ),
        "",
        f"## The schedules at m={args.micro_batches}: measured bubble vs formula",
        "",
        "Each schedule run alternately, --repeats times; measured = mean over runs and ranks",
        "(spread = max - min over runs). zb-h1's formula (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W))",
        "takes the measured mean F, B and W times. Interleaved runs v = 2 chunks per rank, so it",
        "posts twice the messages of 1F1B; communication is not free here.",
        "",
        "| schedule | formula | measured | spread | median step (ms) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['schedule']} | {r['formula']:.3f} | {r['measured']:.3f} | {r['spread']:.3f} "
            f"| {r['step_s'] * 1e3:.1f} |"
            for r in schedules
        ),
        "",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Run both measurements, print the report, and write it with ``--record``."""
    parser = argparse.ArgumentParser(prog="bench_pp", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4, help="for the torch comparison")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--pp-balance", default="params", choices=("layers", "params"))
    parser.add_argument("--threads", type=int, default=None, help="total CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/pp-*.md")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    info = machine_info()
    common = dict(
        model=args.model,
        world_size=args.world_size,
        global_batch_size=args.global_batch_size,
        steps=args.steps,
        pp_balance=args.pp_balance,
        threads=args.threads,
        device=args.device,
        eval_batches=1,
        progress=False,
    )
    start = time.perf_counter()
    print("step time, each schedule vs its torch twin:")
    runs = compare_with_torch(common, args.micro_batches, args.repeats)
    print("bubble vs theory:")
    bubbles = bubble_table(common, [m for m in (1, 2, 4, 8) if args.global_batch_size % m == 0])
    print("the schedules at equal m:")
    schedules = schedules_table(common, args.micro_batches, max(1, args.repeats // 2))
    device = "cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    info["benchmark wall time"] = f"{time.perf_counter() - start:.0f} s"
    report = to_markdown(args, info, device, runs, bubbles, schedules)
    print()
    print(report)
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"pp-{device}.md"
        path.write_text(report)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
