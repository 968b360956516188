"""Benchmark: tensor parallelism (``tp``, 2 ranks) against one process, same total threads.

With ``threads=2`` the single process runs its matrix multiplies on 2 threads, and each of the
2 tensor-parallel ranks on 1 thread with half of every attention/MLP matrix: the same compute
resources, split two ways. The difference is what tensor parallelism costs: 2 all-reduces of the
activations per block forward and 2 backward, plus the replicated layers computed on every rank.
Runs alternate (ABAB) ``--repeats`` times; we compare the fastest steady step of each (noise on a
shared machine only adds time), with the medians alongside.

    python -m benchmarks.bench_tp [--record]      # or: labkit bench tp [--record]

``--record`` writes the table, with the machine, to ``benchmarks/results/tp-<device>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import labkit
from benchmarks.bench_pp import steady_step_times
from labkit.perf import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def measure(common: dict, repeats: int) -> list[dict]:
    """Alternate single and tp runs; one row per run."""
    rows = []
    for i in range(repeats):
        for strategy, world_size in (("single", 1), ("tp", 2)):
            result = labkit.run(**common, strategy=strategy, world_size=world_size)
            m = result.metrics[result.metrics["step"] >= 1]
            rows.append(
                {
                    "repeat": i,
                    "strategy": strategy,
                    "times": steady_step_times(result),
                    "median_step_s": statistics.median(steady_step_times(result)),
                    "comm_share": float((m["comm_s"] / m["step_time_s"]).median()),
                    "comm_mb": float(m["comm_bytes"].median()) / 1e6,
                }
            )
            print(f"  {strategy} run {i}: median step {rows[-1]['median_step_s'] * 1e3:.1f} ms")
    return rows


def to_markdown(args: argparse.Namespace, info: dict[str, str], device: str, rows: list) -> str:
    """The report: machine, config and the side-by-side table."""
    single = [r for r in rows if r["strategy"] == "single"]
    tp = [r for r in rows if r["strategy"] == "tp"]
    # Noise on a shared machine only ever adds time, and it hurts the 2-thread single process
    # most (its threads wait for each other): the fastest step of each is the estimate of its
    # own cost (timeit's rule); the median over all steps is shown next to it.
    all_single = [t for r in single for t in r["times"]]
    all_tp = [t for r in tp for t in r["times"]]
    best_ratio = min(all_tp) / min(all_single)
    median_ratio = statistics.median(all_tp) / statistics.median(all_single)
    lines = [
        f"# Tensor parallelism on {device}: tp (2 ranks) vs single, {args.threads} threads in all",
        "",
        "Command: `python -m benchmarks.bench_tp " + " ".join(args.argv) + "`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"Config: model={args.model}, global_batch_size={args.global_batch_size}, "
        f"steps={args.steps} (step 0 left out), threads={args.threads} in total.",
        "",
        "| repeat | single, median step (ms) | tp, median step (ms) | tp all-reduce share | tp MB sent / step / rank |",
        "|---|---|---|---|---|",
        *(
            f"| {s['repeat']} | {s['median_step_s'] * 1e3:.1f} | {t['median_step_s'] * 1e3:.1f}"
            f" | {t['comm_share']:.2f} | {t['comm_mb']:.1f} |"
            for s, t in zip(single, tp)
        ),
        "",
        f"Fastest step: single {min(all_single) * 1e3:.1f} ms, tp {min(all_tp) * 1e3:.1f} ms.",
        "",
        f"**Ratio tp / single, fastest step: {best_ratio:.3f}**; median over all steps: "
        f"{median_ratio:.3f}",
        "",
        "All-reduce share: time inside tp's all-reduces (timeline 'allreduce' events) over the",
        "step time. MB sent: what a ring all-reduce sends per rank, 2 (p-1)/p x the tensor.",
        "",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Measure, print the report, and write it with ``--record``."""
    parser = argparse.ArgumentParser(prog="bench_tp", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads for each run")
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/tp-*.md")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    info = machine_info()
    common = dict(
        model=args.model,
        global_batch_size=args.global_batch_size,
        steps=args.steps,
        threads=args.threads,
        device=args.device,
        eval_batches=1,
        progress=False,
    )
    start = time.perf_counter()
    print("step time, single vs tp:")
    rows = measure(common, args.repeats)
    device = "cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    info["benchmark wall time"] = f"{time.perf_counter() - start:.0f} s"
    report = to_markdown(args, info, device, rows)
    print()
    print(report)
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"tp-{device}.md"
        path.write_text(report)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
