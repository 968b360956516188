"""Helpers for notebook 03, data parallelism: the demonstrations around the real implementations.

Everything that trains goes through the one training loop; what lives here is the set-up of each
demonstration and its bookkeeping, so the notebook cells stay one line each:

1. ``ring_walkthrough``: one call starts N processes that do a send/recv, a ring all-reduce one
   step at a time (recording what every rank holds after each step), the real
   ``ring_all_reduce`` against ``dist.all_reduce``, and the all-reduce benchmark.
2. ``run_strategies``: several data-parallel strategies trained in the *same* worker processes,
   one after the other, each exactly as ``labkit.run`` trains it (``labkit.launch.run_rank``).
   Starting processes costs seconds; this pays it once for all of them.
3. ``step_breakdown``: where each rank's step time goes (compute, communication hidden under
   compute, exposed communication, the rest), measured from the run's timeline.
4. ``scaling_experiment``: the linear scaling rule, with and without warm-up, when the global
   batch grows k-fold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

import labkit
from labkit.config import TrainConfig
from labkit.launch import spawn
from labkit.lessons import memory as zero
from labkit.lessons.collectives import allreduce_benchmark, exchange, ring_all_reduce
from labkit.lessons.traffic import measured_traffic
from labkit.result import RunResult
from labkit.schedules import scale_lr_linear
from labkit.timeline import COMM_PHASES, covered, merge_intervals
from labkit.train import VAL_BATCH_SIZE

__all__ = [
    "EQUIVALENCE",
    "SCALING_EXPERIMENT",
    "SCALING_RUNS",
    "RingWalkthrough",
    "ring_walkthrough",
    "run_strategies",
    "scaling_experiment",
    "scaling_table",
    "step_breakdown",
    "worst_difference",
]

# ---------------------------------------------------------------------------------------------
# 1. send/recv and the ring all-reduce, step by step
# ---------------------------------------------------------------------------------------------

MESSAGE = (1.0, 2.0, 3.0)  # what rank 0 sends to rank 1 in the send/recv demonstration


@dataclass
class RingWalkthrough:
    """What ``ring_walkthrough`` saw.

    ``received``: the tensor rank 1 received from rank 0 (a plain ``send``/``recv``).
    ``states``: one row per (step, rank, chunk) of the step-by-step ring: ``step`` (0 = start),
    ``phase`` ("start", "reduce-scatter", "all-gather"), ``mask`` (which ranks' contributions the
    chunk holds, as bits: rank r contributes 2**r), ``received`` (True where the chunk just arrived).
    ``matches_all_reduce``: ``ring_all_reduce`` gave ``dist.all_reduce``'s result on random data.
    ``benchmark``: ``allreduce_benchmark``'s rows (torch's all-reduce and the ring, per size).
    """

    world_size: int
    received: list[float]
    states: pd.DataFrame
    matches_all_reduce: bool
    benchmark: pd.DataFrame


def _ring_step_by_step(rank: int, n: int) -> list[dict[str, Any]]:
    """The ring all-reduce of ``ring_all_reduce``, written out with one chunk per element.

    Rank r starts with ``2**r`` in every chunk, so every partial sum is a bit mask saying exactly
    which ranks' contributions it holds. Returns what this rank holds after every step.
    """
    x = torch.full((n,), float(2**rank))
    chunks = list(torch.tensor_split(x, n))  # views into x, one element each
    right, left = (rank + 1) % n, (rank - 1) % n
    snapshots = [("start", 0, -1, x.tolist())]  # (phase, step, chunk received, values)
    # Reduce-scatter: send chunk r - s to the right, add the chunk r - s - 1 arriving from the left.
    for s in range(n - 1):
        send, got = (rank - s) % n, (rank - s - 1) % n
        incoming = torch.empty_like(chunks[got])
        exchange(chunks[send], incoming, right, left, None)
        chunks[got].add_(incoming)
        snapshots.append(("reduce-scatter", s + 1, got, x.tolist()))
    # All-gather: pass the finished chunks on around the ring, overwriting.
    for s in range(n - 1):
        send, got = (rank + 1 - s) % n, (rank - s) % n
        exchange(chunks[send], chunks[got], right, left, None)
        snapshots.append(("all-gather", n + s, got, x.tolist()))
    out = []
    for phase, step, got, values in snapshots:
        for chunk, value in enumerate(values):
            out.append(
                {
                    "step": step,
                    "phase": phase,
                    "rank": rank,
                    "chunk": chunk,
                    "mask": int(value),
                    "received": chunk == got,
                }
            )
    return out


def _ring_walkthrough_worker(
    rank: int, world_size: int, sizes_bytes: tuple[int, ...], iters: int
) -> dict[str, Any]:
    """On every rank: send/recv, the ring step by step, the real ring, the benchmark."""
    # 1. The primitive everything is built from: one process sends, another receives.
    received: list[float] = []
    if rank == 0:
        dist.send(torch.tensor(MESSAGE), dst=1)
    elif rank == 1:
        buffer = torch.zeros(len(MESSAGE))
        dist.recv(buffer, src=0)  # blocks until rank 0's message has arrived
        received = buffer.tolist()
    # 2. The ring all-reduce, one step at a time.
    states = _ring_step_by_step(rank, world_size)
    # 3. labkit's ring_all_reduce against torch's all_reduce, on random data.
    data = torch.randn(1001, generator=torch.Generator().manual_seed(rank))
    ours, theirs = data.clone(), data.clone()
    ring_all_reduce(ours)
    dist.all_reduce(theirs)
    matches = bool(torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6))
    # 4. Timing both (every rank takes part; all report the same rows).
    bench = allreduce_benchmark(sizes_bytes, iters=iters) if sizes_bytes else []
    return {"received": received, "states": states, "matches": matches, "benchmark": bench}


def ring_walkthrough(
    world_size: int = 3,
    sizes_bytes: Sequence[int] = (4 << 10, 64 << 10, 1 << 20, 4 << 20),
    iters: int = 5,
) -> RingWalkthrough:
    """Start ``world_size`` Gloo processes (one start-up) and run the four demonstrations.

    Three ranks by default: with two, a rank's left and right neighbours are the same process
    and the ring is hard to see. ``sizes_bytes=()`` skips the benchmark.
    """
    if world_size < 2:
        raise ValueError(f"world_size={world_size!r} is invalid: a ring needs at least 2 ranks")
    per_rank = spawn(_ring_walkthrough_worker, world_size, (tuple(sizes_bytes), iters), threads=1)
    states = pd.DataFrame([row for result in per_rank for row in result["states"]])
    states = states.sort_values(["step", "rank", "chunk"], kind="stable").reset_index(drop=True)
    return RingWalkthrough(
        world_size=world_size,
        received=per_rank[1]["received"],
        states=states,
        matches_all_reduce=all(result["matches"] for result in per_rank),
        benchmark=pd.DataFrame(per_rank[0]["benchmark"]),
    )


# ---------------------------------------------------------------------------------------------
# 2. Several strategies, one process start-up
# ---------------------------------------------------------------------------------------------

# The equivalence runs of the notebook: the `small` GPT (3.3 MB of fp32 gradients, enough for
# communication to show), 6 steps, 1 MB buckets (about one transformer block each). One thread per
# process: the single-process run and each rank get one core, as if each were one device, so
# their tokens per second compare directly.
EQUIVALENCE: dict[str, Any] = {
    "model": "small",
    "steps": 6,
    "global_batch_size": 8,
    "bucket_mb": 1.0,
    "eval_every": 0,
    "threads": 1,
}


def run_strategies(
    strategies: Iterable[str],
    world_size: int = 2,
    *,
    progress: bool = True,
    **config: Any,
) -> dict[str, RunResult]:
    """Train each strategy on ``world_size`` CPU (Gloo) processes; ``{strategy: RunResult}``.

    Every strategy runs with the same ``config`` (``TrainConfig`` fields), one after the other in
    the same processes, through the per-rank entry ``labkit.run`` uses, so each result is what
    ``labkit.run(strategy=..., world_size=..., **config)`` returns on CPU. The configs are
    validated before any process starts.
    """
    from labkit.launch import run_many

    configs = [
        TrainConfig(strategy=s, world_size=world_size, **{**config, "progress": False})
        for s in strategies
    ]
    if configs and (configs[0].device == "cuda" or configs[0].backend == "nccl"):
        raise ValueError(
            "run_strategies runs on CPU processes over Gloo; for GPUs use "
            "labkit.run(strategy=..., world_size=..., device='cuda') for each strategy"
        )
    results = run_many(configs, progress=progress)
    return {cfg.strategy: result for cfg, result in zip(configs, results, strict=True)}


def worst_difference(reference: RunResult, others: Mapping[str, RunResult]) -> pd.Series:
    """Per strategy, the largest relative difference of any weight tensor from ``reference``."""
    return pd.Series(
        {
            name: float(reference.compare(run)["relative_difference"].max())
            for name, run in others.items()
        },
        name="worst relative difference",
    )


# ---------------------------------------------------------------------------------------------
# 3. Where a step's time goes
# ---------------------------------------------------------------------------------------------


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two disjoint, sorted interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def step_breakdown(runs: RunResult | Mapping[str, RunResult], skip: int = 2) -> pd.DataFrame:
    """Median seconds per step on each rank: compute, hidden and exposed communication, other.

    From the measured timeline, not from summing spans: bucketed all-reduces run concurrently and
    overlap backward, so adding their durations would count the same second several times.
    Columns: ``compute_s`` (forward, backward, optimizer), ``comm_s`` (time any communication was
    in flight), ``hidden_comm_s`` (of it, while computing), ``exposed_comm_s`` (the rest: waiting
    for the network), ``other_s`` (step time not covered by either: data, bookkeeping),
    ``step_time_s``, ``tokens_per_s`` and ``comm_mb`` (megabytes sent per step: for a profiled
    run the measured messages times the ring's factor, ``labkit.lessons.traffic``; otherwise
    labkit's ``comm_bytes`` counter). The first ``skip`` steps (one-off set-up costs) are left
    out. With ``profile=True`` every strategy's communication spans are the backend's own
    records, torch's DDP and FSDP included.
    """
    runs = {"run": runs} if isinstance(runs, RunResult) else runs
    rows = []
    for label, run in runs.items():
        metrics = run.metrics.set_index(["step", "rank"])
        for (rank, step), events in run.timeline.groupby(["rank", "step"]):
            if step < skip:
                continue
            spans = list(zip(events["phase"], events["start_s"], events["end_s"]))
            compute = merge_intervals([(s, e) for p, s, e in spans if p not in COMM_PHASES])
            comm = merge_intervals([(s, e) for p, s, e in spans if p in COMM_PHASES])
            hidden = _intersection(compute, comm)
            row = metrics.loc[(step, rank)]
            step_time = float(row["step_time_s"])
            compute_s, comm_s = covered(compute), covered(comm)
            rows.append(
                {
                    "strategy": label,
                    "rank": int(rank),
                    "step": int(step),
                    "step_time_s": step_time,
                    "compute_s": compute_s,
                    "comm_s": comm_s,
                    "hidden_comm_s": hidden,
                    "exposed_comm_s": comm_s - hidden,
                    "other_s": max(0.0, step_time - compute_s - (comm_s - hidden)),
                    "tokens_per_s": float(row["tokens_per_s"]),
                    "comm_mb": float(row["comm_bytes"]) / 1e6,
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    table = frame.drop(columns="step").groupby(["strategy", "rank"], sort=False).median()
    for label, run in runs.items():  # a profiled run: the measured messages, not the counter
        if len(run.collectives):
            wire = measured_traffic(run, skip).groupby("rank")["ring_wire_bytes"].sum() / 1e6
            for rank, mb in wire.items():
                if (label, rank) in table.index:
                    table.loc[(label, rank), "comm_mb"] = mb
    return table.reset_index()


# ---------------------------------------------------------------------------------------------
# 4. The linear scaling rule
# ---------------------------------------------------------------------------------------------

# SGD with momentum, the setting of Goyal et al. (2017) in which the linear rule was stated. The
# small-batch run takes `steps` steps; the k-times-larger batch sees the same number of sequences
# in steps / k steps. Clipping is off so it cannot hide an unstable start.
SCALING_EXPERIMENT: dict[str, Any] = {
    "model": "nano",
    "block_size": 32,
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr": 0.02,
    "clip": "none",
    "global_batch_size": 4,
    "steps": 640,
    "eval_every": 0,
    "seed": 0,
    "threads": 1,
    "timeline": False,
}
SCALING_RUNS = ("base", "same", "scaled", "warmup")
EVAL_SEQUENCES = 256  # every run is validated on this many sequences, whatever its batch size


def scaling_experiment(
    runs: Sequence[str] = SCALING_RUNS,
    k: int = 4,
    warmup_steps: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, RunResult]:
    """Runs for the linear scaling rule: a base run and runs with a k times larger global batch.

    ``runs`` picks among ``"base"`` (batch B, LR x, ``steps`` steps), ``"same"`` (batch kB, LR x,
    steps / k steps: the same sequences), ``"scaled"`` (batch kB, LR ``scale_lr_linear(x, B, kB)``)
    and ``"warmup"`` (the scaled LR after a linear warm-up of ``warmup_steps``, by default a
    quarter of the large-batch run). Settings: ``SCALING_EXPERIMENT`` updated with ``overrides``.
    All run in this process: by the equivalence invariant a k-rank data-parallel run with that
    global batch computes the same thing.
    """
    from tqdm.auto import tqdm

    unknown = sorted(set(runs) - set(SCALING_RUNS))
    if unknown:
        raise ValueError(f"runs={unknown!r} is invalid: allowed {', '.join(SCALING_RUNS)}")
    base = {**SCALING_EXPERIMENT, **overrides}
    batch, steps, lr = base["global_batch_size"], base["steps"], base["lr"]
    if steps % k:
        raise ValueError(f"k={k!r} is invalid: it must divide steps={steps}")
    big_steps = steps // k
    warmup = big_steps // 4 if warmup_steps is None else warmup_steps
    scaled = scale_lr_linear(lr, batch, k * batch)
    big = {**base, "global_batch_size": k * batch, "steps": big_steps}
    plans = {
        "base": (f"batch {batch}, lr {lr:g}", base),
        "same": (f"batch {k * batch}, same lr {lr:g}", big),
        "scaled": (f"batch {k * batch}, lr {scaled:g} (x{k})", {**big, "lr": scaled}),
        "warmup": (
            f"batch {k * batch}, lr {scaled:g} (x{k}), {warmup}-step warm-up",
            {**big, "lr": scaled, "warmup_steps": warmup},
        ),
    }
    results = {}
    for name in tqdm(runs, desc="runs", disable=not progress, leave=False):
        label, kwargs = plans[name]
        eval_batches = EVAL_SEQUENCES // VAL_BATCH_SIZE
        results[label] = labkit.run(**{**kwargs, "eval_batches": eval_batches, "progress": False})
    return results


def scaling_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """Per run: batch, LR, warm-up, steps, sequences seen, highest loss, final losses.

    ``final_train_loss`` is the mean of the last 5 steps; ``final_val_loss`` the validation loss
    after the last step (NaN if the weights are no longer finite).
    """
    rows = []
    for label, run in runs.items():
        cfg = run.config
        losses = run.losses
        rows.append(
            {
                "run": label,
                "global_batch": cfg.global_batch_size,
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "steps": cfg.steps,
                "sequences_seen": cfg.steps * cfg.global_batch_size,
                "max_loss": float(losses.max()),
                "final_train_loss": float(losses.iloc[-5:].mean()),
                "final_val_loss": run.final_val_loss,
            }
        )
    return pd.DataFrame(rows).set_index("run")


# ---------------------------------------------------------------------- memory per rank
def memory_per_rank(
    strategies: Iterable[str] = ("ddp", "zero1", "fsdp"),
    model: str = "micro",
    world_size: int = 2,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Measured bytes per rank for each strategy (``RunResult.memory``), next to the ZeRO paper.

    Trains two steps of each strategy with Adam on ``world_size`` Gloo processes (all in the same
    processes, ``labkit.launch.run_many``). One row per (strategy, rank) with the measured
    ``params_bytes`` (the resident shards), ``peak_params_bytes`` (with the gathered blocks of
    ZeRO-3/FSDP), ``grads_bytes``, ``optimizer_bytes``, ``activations_bytes``, and
    ``total_bytes`` (parameters + gradients + optimizer state, what the formula counts), the
    ZeRO ``stage`` and its formula's ``paper_total_bytes`` (fp32: 4 + 4 + 8 bytes per parameter
    before sharding).
    """
    from labkit.launch import run_many

    configs = [
        TrainConfig(
            model=model,
            strategy=name,
            world_size=world_size,
            steps=2,
            global_batch_size=2 * world_size,
            optimizer="adam",
            eval_every=0,
            progress=False,
            timeline=False,
        )
        for name in strategies
    ]
    results = run_many(configs, progress=progress, desc="memory per rank")
    frames = []
    for cfg, result in zip(configs, results, strict=True):
        frames.append(result.memory.assign(strategy=cfg.strategy, n_params=result.info["n_params"]))
    frame = pd.concat(frames, ignore_index=True)
    frame["total_bytes"] = frame[["params_bytes", "grads_bytes", "optimizer_bytes"]].sum(axis=1)
    frame["stage"] = frame["strategy"].map(zero.PAPER_STAGE)
    paper = zero.zero_memory_formula(int(frame["n_params"].iloc[0]), world_size).set_index("stage")
    frame["paper_total_bytes"] = frame["stage"].map(paper["total_bytes"])
    frame["measured_over_paper"] = frame["total_bytes"] / frame["paper_total_bytes"]
    return frame.sort_values(["strategy", "rank"], kind="stable").reset_index(drop=True)
