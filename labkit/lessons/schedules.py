"""Helpers for notebook 02, learning-rate schedules and warm-up: the runs and their summaries.

Every run goes through ``labkit.run`` (the one training loop); what lives here is the choice of
settings and the bookkeeping, so the notebook cells stay one line each:

1. ``WARMUP_EXPERIMENT``: settings where warm-up matters at lab scale (nano GPT, Adam, high LR,
   no clipping), and ``warmup_experiment`` to run {pre-LN, post-LN} x {no warm-up, warm-up}.
2. ``unigram_loss`` and ``run_status``: "stalled" means no better than predicting each character
   by its frequency in the corpus, the plateau a collapsed model sits on.
3. ``warmup_table`` / ``schedule_table``: final losses of a set of runs, one row each.
4. ``run_schedules``: runs that differ only in their schedule (cosine vs WSD at equal steps).
5. ``lr_per_step``: the LR a run used at each optimizer step next to the schedule's value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    "SCHEDULE_COMPARISON",
    "WARMUP_EXPERIMENT",
    "lr_per_step",
    "run_schedules",
    "run_status",
    "schedule_table",
    "unigram_loss",
    "warmup_experiment",
    "warmup_table",
]

# The warm-up experiment's settings, found by sweeping LR and warm-up length at lab scale (see
# the notebook). A 2-layer GPT is deep enough for post-LN to need warm-up at a high LR with Adam,
# and small enough that the four runs take seconds. Clipping is off so it cannot hide the effect;
# beta2=0.98 is the original Transformer's value (Vaswani et al. 2017), which also makes Ma &
# Yarats' untuned warm-up (2/(1-beta2) = 100 steps) fit in the run.
WARMUP_EXPERIMENT: dict[str, Any] = {
    "model": "nano",
    "block_size": 32,
    "global_batch_size": 32,
    "steps": 200,
    "optimizer": "adam",
    "lr": 3e-2,
    "beta2": 0.98,
    "schedule": "cosine",
    "clip": "none",
    "eval_every": 50,
    "seed": 0,
    "threads": 1,  # a tiny model runs fastest on one thread (and shares the CPU well)
    "timeline": False,
}

# Cosine vs WSD: the same pre-LN run, the same steps and peak, only the shape after warm-up
# differs (WSD: constant, then a cosine decay over the last 20% of the steps).
SCHEDULE_COMPARISON: dict[str, Any] = {
    "model": "nano",
    "block_size": 32,
    "global_batch_size": 32,
    "steps": 300,
    "lr": 1e-2,
    "warmup_steps": 30,
    "eval_every": 25,
    "seed": 0,
    "threads": 1,
    "timeline": False,
}

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
        "max grad norm": float(m["grad_norm"].max()),
        "status": run_status(result),
    }


def warmup_experiment(
    norms: Sequence[str] = ("pre", "post"),
    warmups: Mapping[str, dict[str, Any]] | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> dict[tuple[str, str], RunResult]:
    """Train every (norm placement, warm-up) pair with ``WARMUP_EXPERIMENT``'s settings.

    ``warmups`` maps a label to the warm-up settings of ``labkit.run`` (default: no warm-up and
    a 50-step linear warm-up); ``overrides`` change the shared settings (e.g. ``lr=1e-2``).
    Returns ``{(norm, label): RunResult}``, in order.
    """
    if warmups is None:
        warmups = {"no warm-up": {"warmup_steps": 0}, "warm-up 50": {"warmup_steps": 50}}
    settings = {**WARMUP_EXPERIMENT, **overrides}
    jobs = [(norm, label) for norm in norms for label in warmups]
    runs: dict[tuple[str, str], RunResult] = {}
    for norm, label in tqdm(jobs, desc="warm-up runs", disable=not progress):
        runs[(norm, label)] = labkit.run(
            **{**settings, **warmups[label], "norm": norm, "progress": False}
        )
    return runs


def warmup_table(runs: Mapping[tuple[str, str], RunResult]) -> pd.DataFrame:
    """One row per (norm, warm-up) run: final train and validation loss, max grad norm, status."""
    rows = [
        {"norm": norm, "warm-up": label, **_summary_row(r)} for (norm, label), r in runs.items()
    ]
    return pd.DataFrame(rows).set_index(["norm", "warm-up"])


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
