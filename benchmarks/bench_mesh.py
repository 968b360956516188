"""Benchmark: composed meshes next to the 1-D strategies of the same world size.

Every mesh that the model allows on ``--world-size`` ranks (dp4, tp4, pp4, dp2 x tp2, dp2 x pp2,
pp2 x tp2 on 4 ranks) plus the data-parallel flavours at dp=world_size, trained one after
another in the same worker processes (``labkit.lessons.mesh.compare_meshes``). Reported per
mesh: the median steady step time of the slowest rank, the peak parameter storage of the
fullest rank (measured from the storages), and the bytes the busiest rank sent per step over
each dimension (counted at the calls into torch.distributed). The whole sweep runs
``--repeats`` times; the table shows the median step over repeats and the spread.

    python -m benchmarks.bench_mesh [--record]      # or: labkit bench mesh [--record]

``--record`` writes the table, with the machine, to ``benchmarks/results/mesh-<device>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import labkit
from labkit.lessons.mesh import MESH_RUN, compare_meshes, mesh_shapes
from labkit.perf import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def meshes(model: str, world_size: int) -> list[dict]:
    """Every valid shape, plus each data-parallel flavour over all the ranks."""
    out = [dict(s) for s in mesh_shapes(model, world_size)]
    for impl in ("naive", "ddp", "zero1", "zero2", "zero3", "fsdp"):
        out.append({"dp": world_size, "pp": 1, "tp": 1, "dp_impl": impl})
    return out


def to_markdown(args: argparse.Namespace, info: dict[str, str], device: str, runs: list) -> str:
    """The report: machine, config and the side-by-side table (median over repeats)."""
    first = runs[0]
    lines = [
        f"# Composed meshes on {device}: {args.world_size} ranks, {args.model} GPT",
        "",
        "Command: `python -m benchmarks.bench_mesh " + " ".join(args.argv) + "`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"Config: {MESH_RUN | {'model': args.model, 'steps': args.steps}} (step 0 left out); "
        f"{args.repeats} repeats of the whole sweep, each mesh in the same {args.world_size} "
        "worker processes. Step time: median over repeats of the slowest rank's median step "
        "(min-max over repeats in brackets). Memory: peak parameter storage of the fullest "
        "rank, measured. Bytes: what the busiest rank sent per step over each dimension.",
        "",
        "| mesh | step (ms) | peak params (KiB) | dp KB | pp KB | tp KB | max rel. diff vs single |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in first.index:
        steps = [r.loc[label, "step_ms"] for r in runs]
        row = first.loc[label]
        lines.append(
            f"| {label} | {statistics.median(steps):.1f} ({min(steps):.1f}-{max(steps):.1f}) | "
            f"{row['params_MiB'] * 1024:.0f} | {row['dp_KB']:.1f} | {row['pp_KB']:.1f} | "
            f"{row['tp_KB']:.1f} | {row['max_rel_diff']:.1e} |"
        )
    lines += [
        "",
        "Bytes and memory are the same in every repeat (they follow from the mesh); step times "
        "on a 2-core machine with 4 processes mostly measure contention and Gloo latency, so "
        "read them as this machine's, not a cluster's.",
    ]
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> int:
    """Entry point of ``labkit bench mesh``."""
    parser = argparse.ArgumentParser(prog="labkit bench mesh", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="micro")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/mesh-*.md")
    args = parser.parse_args(argv)
    args.argv = argv
    fields = {"model": args.model, "steps": args.steps}
    reference = labkit.run(**MESH_RUN | fields | {"progress": False})
    runs = []
    for i in range(args.repeats):
        frame = compare_meshes(
            meshes(args.model, args.world_size), reference=reference, progress=False, **fields
        )
        runs.append(frame.drop(columns="result"))
        print(f"repeat {i}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in frame["step_ms"].items()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = to_markdown(args, machine_info(), device, runs)
    print(text)
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"mesh-{device}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
