"""Helpers for notebook 02, learning-rate schedules and warm-up: the runs and their summaries.

Every run goes through ``labkit.run`` (the one training loop); what lives here is the choice of
settings and the bookkeeping, so the notebook cells stay one line each:

1. ``WARMUP_EXPERIMENT``: settings where warm-up matters at lab scale (nano GPT, Adam, high LR,
   no clipping), and ``warmup_experiment`` to run {pre-LN, post-LN} x {no warm-up, warm-up} on
   several seeds, one row per run. ``warmup_gaps``, ``warmup_spread``, ``warmup_headline`` and
   ``describe_headline`` summarise it over seeds (``TUNING_SEEDS`` chose the settings,
   ``CONFIRM_SEEDS`` check them).
2. ``unigram_loss`` and ``run_status``: "stalled" means no better than predicting each character
   by its frequency in the corpus, the plateau a collapsed model sits on.
3. ``run_schedules`` / ``schedule_table``: runs that differ only in their schedule (cosine vs WSD
   at equal steps); ``schedule_experiment`` repeats them over seeds, ``schedule_spread`` and
   ``schedule_verdict`` set the difference against the seed-to-seed noise.
4. ``lr_per_step``: the LR a run used at each optimizer step next to the schedule's value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import labkit
from labkit.data import load_corpus
from labkit.result import RunResult

__all__ = [
    "CONFIRM_SEEDS",
    "MUCH_WORSE",
    "SCHEDULE_COMPARISON",
    "SCHEDULE_SEEDS",
    "TUNING_SEEDS",
    "UNTUNED_WARMUPS",
    "WARMUP_EXPERIMENT",
    "WARMUP_STEPS",
    "default_warmups",
    "describe_headline",
    "lr_per_step",
    "run_schedules",
    "run_status",
    "schedule_experiment",
    "schedule_spread",
    "schedule_table",
    "schedule_verdict",
    "unigram_loss",
    "warmup_experiment",
    "warmup_gaps",
    "warmup_headline",
    "warmup_spread",
]

# The warm-up experiment's settings, chosen with a sweep on TUNING_SEEDS (peak LR 2e-2 to 1e-1,
# beta2 0.98 and 0.999, batch 16 and 32, 100 to 150 steps, warm-ups of 25 to 80 steps) and then
# checked on CONFIRM_SEEDS, which played no part in the choice. The 2-block nano GPT is the only
# preset cheap enough for 40 runs in a notebook. Post-LN fails without warm-up only in a narrow
# band of LRs: at 2e-2 it trains without one, at 1e-1 it fails even with one; 3.5e-2 with a
# 70-step warm-up was where the gap was large in every tuning seed and every warmed-up post-LN
# run trained. Clipping is off so it cannot hide the effect. beta2=0.98 is the original
# Transformer's value (Vaswani et al. 2017); 0.999 gave the same picture with more warmed-up runs
# failing. A batch of 32 (not 16) keeps pre-LN stable; one evaluation, at the end, saves time.
WARMUP_EXPERIMENT: dict[str, Any] = {
    "model": "nano",
    "block_size": 32,
    "global_batch_size": 32,
    "steps": 100,
    "optimizer": "adam",
    "lr": 3.5e-2,
    "beta2": 0.98,
    "schedule": "cosine",
    "clip": "none",
    "eval_every": 100,
    "seed": 0,
    "threads": 1,  # a tiny model runs fastest on one thread (and shares the CPU well)
    "timeline": False,
}
WARMUP_STEPS = 70  # the linear warm-up the experiment compares with none
# Ma & Yarats' untuned warm-ups (their length comes from beta2: 2/(1-0.98) = 100 steps linear,
# a time constant of 50 steps exponential), for ``warmup_experiment(warmups=UNTUNED_WARMUPS)``.
UNTUNED_WARMUPS: dict[str, dict[str, Any]] = {
    "untuned linear": {"warmup": "untuned_linear"},
    "untuned exponential": {"warmup": "untuned_exponential"},
}
TUNING_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)  # the settings above were chosen on these ...
CONFIRM_SEEDS: tuple[int, ...] = (5, 6, 7, 8, 9)  # ... and checked on these, unseen until then
# A difference in final validation loss this large (nats per character) is a run that failed,
# not noise: over seeds, the final loss of one setting has a std of about 0.1 to 0.25.
MUCH_WORSE = 0.5

# Cosine vs WSD: the same pre-LN run, the same steps and peak, only the shape after warm-up
# differs (WSD: constant, then a cosine decay over the last 20% of the steps). 200 steps, so
# that three seeds of each fit in the notebook's time.
SCHEDULE_COMPARISON: dict[str, Any] = {
    "model": "nano",
    "block_size": 32,
    "global_batch_size": 32,
    "steps": 200,
    "lr": 1e-2,
    "warmup_steps": 30,
    "eval_every": 25,
    "seed": 0,
    "threads": 1,
    "timeline": False,
}
SCHEDULE_SEEDS: tuple[int, ...] = (0, 1, 2)  # one seed is an anecdote

# A run "stalls" when its validation loss stays within this margin (nats) of the unigram loss.
STALL_MARGIN = 0.1


@lru_cache(maxsize=4)
def unigram_loss(corpus: str = "pydoc") -> float:
    """Cross-entropy (nats per character) on the validation text of predicting every character
    by its frequency in the training text: the loss of a model that ignores its input.

    A language model passes through this plateau early in training; one that stays there has
    learned letter frequencies and nothing else.
    """
    data = load_corpus(corpus)
    counts = torch.bincount(data.train, minlength=data.vocab_size).double() + 1.0  # add-one
    log_p = (counts / counts.sum()).log()
    return float(-log_p[data.val].mean())


def run_status(result: RunResult, corpus: str | None = None) -> str:
    """``"diverged"`` (a non-finite loss), ``"stalled"`` (final validation loss within
    ``STALL_MARGIN`` of the unigram loss) or ``"trains"``."""
    m = result.metrics[result.metrics["rank"] == 0]
    if not np.isfinite(m["loss"].to_numpy(dtype=float)).all() or int(m["skipped"].sum()):
        return "diverged"
    plateau = unigram_loss(corpus or result.config.corpus)
    if not math.isfinite(result.final_val_loss) or result.final_val_loss > plateau - STALL_MARGIN:
        return "stalled"
    return "trains"


def _summary_row(result: RunResult, tail: int = 20) -> dict[str, Any]:
    m = result.metrics[result.metrics["rank"] == 0]
    return {
        # The last steps' mean: one small batch's loss is too noisy to compare runs by.
        f"train loss (last {tail} steps)": float(m["loss"].tail(tail).mean()),
        "validation loss": result.final_val_loss,
        "max train loss": float(m["loss"].max()),
        "max grad norm": float(m["grad_norm"].max()),
        "status": run_status(result),
    }


def default_warmups(steps: int = WARMUP_STEPS) -> dict[str, dict[str, Any]]:
    """The two warm-up settings the experiment compares: none, and a ``steps``-step linear one."""
    return {"no warm-up": {"warmup_steps": 0}, f"warm-up {steps}": {"warmup_steps": steps}}


def warmup_experiment(
    seeds: Iterable[int] = TUNING_SEEDS,
    *,
    norms: Sequence[str] = ("pre", "post"),
    warmups: Mapping[str, dict[str, Any]] | None = None,
    runs: dict[tuple[str, str, int], RunResult] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """Train every (norm placement, warm-up, seed) with ``WARMUP_EXPERIMENT``'s settings.

    ``warmups`` maps a label to warm-up settings of ``labkit.run`` (default: ``default_warmups()``,
    none and ``WARMUP_STEPS`` linear steps); ``overrides`` change the shared settings (e.g.
    ``lr=1e-2``). Returns one row per run, in order (norm, warm-up, seed), with the final losses,
    ``max train loss`` (a spike shows there), ``status`` (see ``run_status``), ``diverged`` (a
    non-finite loss), ``warmup length`` (steps until the warm-up is over) and ``max lr`` (the
    highest LR the run used). Pass a dict as ``runs`` to
    keep the RunResults too, keyed ``(norm, label, seed)``, e.g. to plot their curves.
    """
    warmups = default_warmups() if warmups is None else warmups
    seeds = list(seeds)
    settings = {**WARMUP_EXPERIMENT, **overrides}
    jobs = [(norm, label, seed) for norm in norms for label in warmups for seed in seeds]
    rows = []
    for norm, label, seed in tqdm(jobs, desc="warm-up runs", disable=not progress):
        result = labkit.run(
            **{**settings, **warmups[label], "norm": norm, "seed": seed, "progress": False}
        )
        if runs is not None:
            runs[(norm, label, seed)] = result
        row = {"norm": norm, "warm-up": label, "seed": seed, **_summary_row(result)}
        row["diverged"] = row["status"] == "diverged"
        row["warmup length"] = result.config.lr_schedule().warmup_length
        row["max lr"] = float(result.metrics["lr"].max())
        rows.append(row)
    return pd.DataFrame(rows)


def warmup_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed and norm: final validation loss without warm-up minus with it (the first two
    warm-up labels of ``table``, in order). Positive: the warm-up helped. One column per norm."""
    base, warm = list(dict.fromkeys(table["warm-up"]))[:2]
    val = table.pivot_table(index="seed", columns=["norm", "warm-up"], values="validation loss")
    norms = list(dict.fromkeys(table["norm"]))
    gaps = pd.DataFrame({norm: val[(norm, base)] - val[(norm, warm)] for norm in norms})
    gaps.columns.name = f"{base} minus {warm}"
    return gaps


def warmup_spread(table: pd.DataFrame) -> pd.DataFrame:
    """Final validation loss over seeds per (norm, warm-up): mean, std, min, max, and how many
    runs stalled or diverged (a ``status`` other than "trains"); ``max lr``, the highest LR any
    of them used, when the table has it."""
    grouped = table.groupby(["norm", "warm-up"], sort=False)
    spread = grouped["validation loss"].agg(["mean", "std", "min", "max"])
    spread["failed"] = grouped["status"].agg(lambda s: int((s != "trains").sum()))
    spread["seeds"] = grouped.size()
    if "max lr" in table:
        spread["max lr"] = grouped["max lr"].max()
    return spread


def warmup_headline(table: pd.DataFrame, much_worse: float = MUCH_WORSE) -> dict[str, Any]:
    """Does the headline hold? Per norm, the number of seeds where skipping warm-up cost more
    than ``much_worse`` nats of final validation loss, and the gaps' min, mean and max.

    ``holds`` is True when post-LN lost that much in at least 80% of the seeds (4 of 5) and
    pre-LN in at most 20% (1 of 5): post-LN needs the warm-up, pre-LN far less.
    """
    gaps = warmup_gaps(table)
    n = len(gaps)
    counts = {norm: int((gaps[norm] > much_worse).sum()) for norm in gaps}
    return {
        "seeds": n,
        "much worse": counts,
        "gap min": gaps.min().to_dict(),
        "gap mean": gaps.mean().to_dict(),
        "gap max": gaps.max().to_dict(),
        "holds": counts.get("post", 0) >= 0.8 * n and counts.get("pre", 0) <= 0.2 * n,
    }


def describe_headline(table: pd.DataFrame, much_worse: float = MUCH_WORSE) -> str:
    """``warmup_headline`` as sentences: per norm, how many seeds lost more than ``much_worse``
    without warm-up, and the range and mean of the gaps."""
    h = warmup_headline(table, much_worse)
    lines = [
        f"{norm}-LN: skipping the warm-up costs more than {much_worse:g} in "
        f"{h['much worse'][norm]} of {h['seeds']} seeds (validation loss "
        f"{h['gap min'][norm]:+.2f} to {h['gap max'][norm]:+.2f}, mean {h['gap mean'][norm]:+.2f})"
        for norm in h["much worse"]
    ]
    return "\n".join(lines)


def run_schedules(
    schedules: Mapping[str, dict[str, Any]], *, progress: bool = True, **overrides: Any
) -> dict[str, RunResult]:
    """One run per entry of ``schedules`` (label -> schedule settings of ``labkit.run``), with
    ``SCHEDULE_COMPARISON``'s shared settings (changed by ``overrides``)."""
    settings = {**SCHEDULE_COMPARISON, **overrides}
    return {
        label: labkit.run(**{**settings, **schedule, "progress": False})
        for label, schedule in tqdm(schedules.items(), desc="schedules", disable=not progress)
    }


def schedule_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """One row per run: final train and validation loss, and the best validation loss seen."""
    rows = []
    for label, r in runs.items():
        row = {"schedule": label, **_summary_row(r)}
        row["best validation loss"] = float(r.metrics["val_loss"].min())
        rows.append(row)
    return pd.DataFrame(rows).set_index("schedule").drop(columns=["status", "max grad norm"])


def schedule_experiment(
    schedules: Mapping[str, dict[str, Any]],
    seeds: Iterable[int] = SCHEDULE_SEEDS,
    *,
    runs: dict[tuple[str, int], RunResult] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """``run_schedules`` on several seeds: one row per (schedule, seed), in that order, with the
    final train and validation loss, the best validation loss seen and the validation loss at 80%
    of the run (the last evaluation before WSD's decay; its stable phase ends there). Pass a dict as ``runs`` to
    keep the RunResults, keyed ``(label, seed)``."""
    seeds = list(seeds)
    jobs = [(label, seed) for label in schedules for seed in seeds]
    settings = {**SCHEDULE_COMPARISON, **overrides}
    rows = []
    for label, seed in tqdm(jobs, desc="schedule runs", disable=not progress):
        result = labkit.run(**{**settings, **schedules[label], "seed": seed, "progress": False})
        if runs is not None:
            runs[(label, seed)] = result
        row = {"schedule": label, "seed": seed, **_summary_row(result)}
        row["best validation loss"] = float(result.metrics["val_loss"].min())
        # Where WSD's decay starts: the last evaluation at or before 80% of the run.
        evals = result.metrics.dropna(subset=["val_loss"])
        before = evals[evals["step"] <= 0.8 * result.config.steps]
        row["validation loss at 80%"] = (
            float(before["val_loss"].iloc[-1]) if len(before) else math.nan
        )
        rows.append(row)
    return pd.DataFrame(rows).drop(columns=["max train loss", "max grad norm"])


def schedule_spread(table: pd.DataFrame, value: str = "validation loss") -> pd.DataFrame:
    """``value`` over seeds per schedule (mean, std, min, max), and seed by seed its difference
    from the first schedule (``minus <first>``: mean, min, max), to set a gap against the noise."""
    order = list(dict.fromkeys(table["schedule"]))
    wide = table.pivot(index="seed", columns="schedule", values=value)[order]
    spread = wide.agg(["mean", "std", "min", "max"]).T
    diff = wide.sub(wide[order[0]], axis=0)
    for stat in ("mean", "min", "max"):
        spread[f"minus {order[0]}: {stat}"] = diff.agg(stat)
    spread.index.name = "schedule"
    return spread


def schedule_verdict(table: pd.DataFrame, value: str = "validation loss") -> str:
    """One sentence per schedule: its mean ``value`` over seeds and, after the first, its
    difference from the first seed by seed, called beyond the noise only when it has the same
    sign in every seed."""
    spread = schedule_spread(table, value)
    first = spread.index[0]
    n = table["seed"].nunique()
    lines = []
    for label in spread.index:
        row = spread.loc[label]
        line = f"{label}: {value} {row['mean']:.3f} (mean of {n} seeds, std {row['std']:.3f})"
        if label != first:
            lo, mean, hi = (row[f"minus {first}: {s}"] for s in ("min", "mean", "max"))
            if lo > 0 or hi < 0:
                verdict = f"{'higher' if lo > 0 else 'lower'} than {first} in every seed"
            else:
                verdict = "within the noise (the sign changes from seed to seed)"
            line += f"; minus {first}: {mean:+.3f} ({lo:+.3f} to {hi:+.3f}), {verdict}"
        lines.append(line)
    return "\n".join(lines)


def lr_per_step(result: RunResult) -> pd.DataFrame:
    """The LR of each optimizer step of a run, the micro-batches done by then, and the schedule.

    ``lr`` is what the optimizer used (read from its param group by the training loop);
    ``schedule_lr`` is ``get_schedule(...)(step)`` for the run's settings: they agree, whatever
    ``grad_accum_steps`` is, because the schedule counts optimizer steps, not micro-batches.
    """
    cfg = result.config
    schedule = cfg.lr_schedule()
    m = result.metrics[result.metrics["rank"] == 0]
    return pd.DataFrame(
        {
            "step": m["step"].to_numpy(),
            "micro-batches done": (m["step"].to_numpy() + 1) * cfg.grad_accum_steps,
            "lr": m["lr"].to_numpy(),
            "schedule_lr": [schedule(int(s)) for s in m["step"]],
        }
    ).set_index("step")
