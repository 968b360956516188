"""Helpers for notebook 04, pipeline parallelism: the demonstrations around the real pipeline.

The pipeline itself (stage cutting, the GPipe and 1F1B schedules) lives in
``labkit.parallel.pipeline``, the timeline analysis in ``labkit.lessons.pipeline_timeline``; everything that trains goes through the one training loop. What
lives here is the set-up of each demonstration, so that the notebook cells stay one line each:

1. ``PIPELINE``: the run settings the notebook shares, and ``stage_table``: which layers (and how
   many parameters) each stage gets.
2. ``simulate_schedule``: the *ideal* timeline of a schedule (fixed forward and backward times,
   free communication), in the same columns as a measured one, so the same Gantt chart and the
   same ``bubble_fraction`` apply to both.
3. ``run_pipelines``: several pipeline runs in the *same* two worker processes, one after the
   other, each exactly as ``labkit.run`` trains it; starting processes costs seconds, this pays
   it once. ``sweep_table`` reads the bubble and the activation peaks out of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from labkit.config import TrainConfig
from labkit.lessons.pipeline_timeline import bubble_fraction, peak_activations
from labkit.model import count_params
from labkit.parallel.pipeline import Order, gpipe_order, one_f_one_b_order, stage_bounds
from labkit.parallel.pp_orders import ORDERS, bubble_formula
from labkit.result import RunResult

__all__ = [
    "FOUR_STAGES",
    "PIPELINE",
    "SCHEDULES",
    "measured_vs_formula",
    "run_four_stages",
    "run_pipelines",
    "simulate_schedule",
    "simulated_bubbles",
    "stage_table",
    "steady_step_ms",
    "step_times",
    "sweep_table",
]

# The notebook's runs: the `small` GPT (4 blocks of width 128), whose stages take tens of
# milliseconds, so compute, not Python overhead, fills the Gantt chart; 48 sequences per step,
# divisible by 1, 2, 3, 4, 6 and 8 micro-batches; three steps: the first pays one-off costs, the
# bubble is measured on the other two and the charts show the last; one validation batch, since
# nothing here reads the validation loss that every run computes at its end. ``world_size`` and
# ``threads`` are left to each call: two pipeline ranks get one CPU thread each (``threads=2``
# in total), the single-process reference one thread, so nothing fights over two shared cores.
PIPELINE: dict[str, Any] = {
    "model": "small",
    "steps": 3,
    "global_batch_size": 48,
    "eval_every": 0,
    "eval_batches": 1,
}

# Four stages for section 8: `medium` has 6 blocks, so 8 layers make 4 ranks x 2 chunks for
# interleaving; a short context keeps each of the 4 processes cheap on 2 cores. m = 8 matches
# the simulated charts of section 7.
FOUR_STAGES: dict[str, Any] = {
    **PIPELINE,
    "model": "medium",
    "block_size": 16,
    "global_batch_size": 16,
    "world_size": 4,
    "threads": 2,
}
FOUR_STAGE_RUNS: dict[str, dict[str, Any]] = {
    "1F1B": {"pp_schedule": "1f1b"},
    "interleaved 1F1B, v=2": {"pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2},
    "ZB-H1": {"pp_schedule": "zb-h1"},
}

# The hand-written schedules by strategy name; pp-torch runs torch's own 1F1B.
SCHEDULES: dict[str, Callable[..., Order]] = {
    "pp-gpipe": gpipe_order,
    "pp-1f1b": one_f_one_b_order,
}


# ---------------------------------------------------------------------------------------------
# 1. The cut
# ---------------------------------------------------------------------------------------------


def stage_table(model: str = "small", world_size: int = 2, balance: str = "layers") -> pd.DataFrame:
    """One row per stage: the layers it runs and their parameter count.

    Built the way every pipeline rank builds it: the whole GPT from the seed, cut by
    ``stage_bounds``.
    """
    from labkit.train import build_model

    gpt = build_model(TrainConfig(model=model))
    names, layers = gpt.layer_names(), gpt.layers()
    rows = []
    for stage, (start, stop) in enumerate(stage_bounds(gpt, world_size, balance)):
        rows.append(
            {
                "stage (rank)": stage,
                "layers": ", ".join(names[start:stop]),
                "parameters": sum(count_params(layer) for layer in layers[start:stop]),
            }
        )
    return pd.DataFrame(rows).set_index("stage (rank)")


# ---------------------------------------------------------------------------------------------
# 2. The ideal timeline of a schedule
# ---------------------------------------------------------------------------------------------


def simulate_schedule(
    schedule: str | Callable[..., Order],
    n_micro: int,
    n_stages: int,
    forward_s: float = 1.0,
    backward_s: float = 2.0,
    *,
    n_chunks: int = 1,
    weight_s: float | None = None,
) -> pd.DataFrame:
    """The timeline a schedule would produce if every stage took the same time and sends were free.

    ``schedule`` is a strategy name (``"pp-gpipe"``, ``"pp-1f1b"``), a ``pp_schedule`` name
    (``"interleaved-1f1b"``, ``"zb-h1"``, ...) or an order function such as ``gpipe_order``.
    Each stage runs its actions in order, each as early as it can: a forward needs the previous
    virtual stage's forward of the same micro-batch, a backward the next one's backward (the
    last stage's, its own forward), a weight pass (``W``) its own backward. A backward costs
    about twice a forward (two matrix products per weight instead of one), hence the default
    times; with ``n_chunks = v`` each chunk costs ``1/v`` of them. A schedule that splits the
    backward spends ``weight_s`` (half the backward by default) in ``W`` and the rest in ``B``.
    Returns one step's events in the columns of ``RunResult.timeline`` (``start_s``/``end_s`` in
    these time units) plus ``chunk``; W passes have the phase ``"weight"``.
    """
    if isinstance(schedule, str):
        order_fn = SCHEDULES.get(schedule) or ORDERS[schedule]
    else:
        order_fn = schedule
    p, v = n_stages, n_chunks
    # An order function of one's own may take (n_micro, stage, n_stages) only.
    orders = [order_fn(n_micro, s, p) if v == 1 else order_fn(n_micro, s, p, v) for s in range(p)]
    split = any(a[0] == "W" for order in orders for a in order)
    w = (backward_s / 2 if weight_s is None else weight_s) if split else 0.0
    cost = {"F": forward_s / v, "B": (backward_s - w) / v, "W": w / v}
    phase = {"F": "forward", "B": "backward", "W": "weight"}
    last = p * v - 1  # the last virtual stage computes the loss
    done: dict[tuple[str, int, int], float] = {}  # (action, virtual stage, micro-batch) -> end
    free = [0.0] * p  # when each stage finishes its previous action
    position = [0] * p  # the next action of each stage
    rows = []
    while any(position[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(orders[s]):
                continue
            action, i, *rest = orders[s][position[s]]
            chunk = rest[0] if rest else 0
            vs = chunk * p + s
            if action == "F":
                needs = ("F", vs - 1, i) if vs > 0 else None
            elif action == "B":
                needs = ("B", vs + 1, i) if vs < last else ("F", vs, i)
            else:
                needs = ("B", vs, i)
            if needs is not None and needs not in done:
                continue  # waiting for a neighbour: this is where the bubble comes from
            start = max(free[s], done[needs] if needs else 0.0)
            end = start + cost[action]
            done[(action, vs, i)] = free[s] = end
            rows.append((s, 0, i, phase[action], start, end, chunk))
            position[s] += 1
            progressed = True
        if not progressed:
            raise ValueError("the schedule deadlocks: every stage waits for another")
    columns = ["rank", "step", "micro_batch", "phase", "start_s", "end_s", "chunk"]
    return pd.DataFrame(rows, columns=columns)


def simulated_bubbles(
    schedules: Sequence[str], stages: Sequence[int], micro: Sequence[int], n_chunks: int = 2
) -> pd.DataFrame:
    """Simulated against textbook bubble fractions for every schedule, p and m.

    Costs: forward 1, backward 2 (zero-bubble schedules: B 1 and W 1). One row per
    (schedule, p, m): ``simulated`` (the idle share of a stage's step, ``bubble_fraction`` of
    ``simulate_schedule``, the largest over stages) and ``formula`` (``pp_orders.bubble_formula``).
    """
    rows = []
    for name in schedules:
        v = n_chunks if name == "interleaved-1f1b" else 1
        for p in stages:
            for m in micro:
                if name == "interleaved-1f1b" and m % p:
                    continue  # the schedule needs m to be a multiple of p
                if name == "zb-h1" and m < p:
                    continue  # the formula is for m >= p (Qi et al.'s setting)
                tl = simulate_schedule(name, m, p, n_chunks=v)
                bubble = bubble_fraction(tl, micro_batches=m, skip_steps=0)["bubble"].max()
                rows.append(
                    {
                        "schedule": name,
                        "p": p,
                        "m": m,
                        "v": v,
                        "simulated": float(bubble),
                        "formula": bubble_formula(name, m, p, v),
                    }
                )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 3. Several pipeline runs, one process start-up
# ---------------------------------------------------------------------------------------------


def run_pipelines(
    runs: Mapping[str, Mapping[str, Any]],
    *,
    progress: bool = True,
    **common: Any,
) -> dict[str, RunResult]:
    """Train several configurations on the same CPU (Gloo) worker processes; ``{label: RunResult}``.

    ``runs`` maps a label to the fields that differ (``strategy``, ``micro_batches``); ``common``
    holds the rest (``PIPELINE`` on two ranks, one thread each, by default). Each result is what ``labkit.run(**common, **fields)``
    returns. Every configuration is validated before a process starts, and all must share one
    ``world_size``.
    """
    from labkit.launch import run_many

    common = {**PIPELINE, "world_size": 2, "threads": 2, **common, "progress": False}
    configs = [TrainConfig(**{**common, **fields}) for fields in runs.values()]
    if len({c.world_size for c in configs}) > 1:
        sizes = sorted({c.world_size for c in configs})
        raise ValueError(f"world_size={sizes} is invalid: the runs share one process group")
    results = run_many(configs, progress=progress, desc="pipeline runs")
    return dict(zip(runs, results, strict=True))


def run_four_stages(progress: bool = True) -> tuple[dict[str, RunResult], RunResult]:
    """1F1B, interleaved 1F1B (v = 2) and ZB-H1 on 4 real pipeline ranks, m = 8, and the
    one-process run of the same settings: ``({label: RunResult}, single)``."""
    import labkit

    runs = run_pipelines(
        {
            label: {"strategy": "mesh", "pp": 4, "micro_batches": 8, **fields}
            for label, fields in FOUR_STAGE_RUNS.items()
        },
        progress=progress,
        **FOUR_STAGES,
    )
    settings = {k: v for k, v in FOUR_STAGES.items() if k not in ("world_size", "threads")}
    return runs, labkit.run(**settings, threads=1, progress=False)


def steady_step_ms(run: RunResult) -> float:
    """A run's measured step time in milliseconds: the median over the steps after the first
    (which pays one-off costs), of its slowest rank (a step ends when every rank is done)."""
    return 1e3 * run.steady_step_s()


def step_times(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """Each run's ``steady_step_ms`` beside its number of processes, one row per run."""
    rows = [
        {"run": label, "processes": run.config.world_size, "step_ms": steady_step_ms(run)}
        for label, run in runs.items()
    ]
    return pd.DataFrame(rows).set_index("run")


def sweep_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """One row per run and rank: schedule, m, step and busy time, bubble, theory, activation peaks.

    Over the steps after the first (which pays one-off costs): ``step_ms`` is the rank's median
    step time, ``busy_ms`` its mean forward-plus-backward time per step, ``bubble`` the measured
    idle fraction (``bubble_fraction``). ``peak`` is the most micro-batches whose activations
    the stage held at once; ``peak_sequences`` multiplies it by the sequences per micro-batch,
    which is what memory follows when the global batch is fixed.
    """
    rows = []
    for label, run in runs.items():
        cfg = run.config
        bubble = bubble_fraction(run.timeline)
        busy_ms = (
            bubble_fraction(run.timeline, per_step=True).groupby("rank")["busy_s"].mean() * 1e3
        )
        peaks = peak_activations(run.timeline)
        rows_per_micro = cfg.global_batch_size // cfg.grad_accum_steps // cfg.micro_batches
        m = run.metrics
        steady = m[m["step"] >= min(1, int(m["step"].max()))]
        step_ms = steady.groupby("rank")["step_time_s"].median() * 1e3
        for rank in bubble.index:
            rows.append(
                {
                    "run": label,
                    "schedule": cfg.strategy,
                    "micro_batches": cfg.micro_batches,
                    "rank": int(rank),
                    "step_ms": float(step_ms.loc[rank]),
                    "busy_ms": float(busy_ms.loc[rank]),
                    "bubble": float(bubble.loc[rank, "bubble"]),
                    "theory": float(bubble.loc[rank, "theory"]),
                    "peak": int(peaks.loc[rank, "peak"]),
                    "peak_sequences": int(peaks.loc[rank, "peak"]) * rows_per_micro,
                }
            )
    return pd.DataFrame(rows)


def measured_vs_formula(runs: Mapping[str, RunResult], reference: RunResult) -> pd.DataFrame:
    """Per run: its schedule's formula (fed the run's own mean F, B and W times), the measured
    bubble (mean over ranks, steps after the first), the median step time, the largest relative
    difference of any weight from ``reference``'s (``max_rel_diff``) and whether it is at most
    1e-5 (``equals_single``)."""
    rows = []
    for label, run in runs.items():
        cfg, tl = run.config, run.timeline
        m = cfg.micro_batches
        cost = (tl["end_s"] - tl["start_s"]).groupby(tl["phase"]).mean()
        formula = bubble_formula(
            cfg.pp_schedule,
            m,
            cfg.pp,
            cfg.pp_virtual_stages,
            forward=cost.get("forward", 1.0),
            backward=cost.get("backward", 1.0),
            weight=cost.get("weight", 0.0),
        )
        steps = run.metrics[run.metrics["step"] >= 1].groupby("step")["step_time_s"].max()
        worst = float(run.compare(reference)["relative_difference"].max())
        rows.append(
            {
                "schedule": label,
                "formula": formula,
                "measured": float(bubble_fraction(tl, micro_batches=m)["bubble"].mean()),
                "step_ms": float(steps.median() * 1e3),
                "max_rel_diff": worst,
                "equals_single": bool(worst <= 1e-5),
            }
        )
    return pd.DataFrame(rows).set_index("schedule")
