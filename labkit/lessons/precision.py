"""Helpers for notebook 08, memory and precision: where a step's bytes go, recomputation's
trade, and what bf16 and fp16 do to training.

1. ``memory_breakdown``: one run's measured bytes per category (``RunResult.memory``) beside the
   model-state formula (4 + 4 + 8 bytes per parameter with Adam in fp32).
2. ``recompute_experiment``: the same run with ``recompute`` none, selective and full: measured
   activation bytes, step time and the largest weight difference from ``none``.
3. ``precision_experiment``: fp32, bf16 and fp16 on several seeds: final loss (spread over
   seeds) and step time.
4. ``gradient_magnitudes`` and ``fp16_fate``: the gradient values of a real backward pass, and
   which of them fp16 would flush to zero or overflow at a given loss scale (what a GradScaler
   is for).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

import labkit
from labkit.result import RunResult

__all__ = [
    "FP16_MAX",
    "FP16_SMALLEST",
    "FP16_SMALLEST_NORMAL",
    "MEMORY_RUN",
    "fp16_fate",
    "gradient_magnitudes",
    "memory_breakdown",
    "precision_experiment",
    "recompute_experiment",
]

# fp16's range: the largest finite value, and the smallest positive (subnormal) one. Below half
# of the smallest a value rounds to zero; above the largest it becomes inf.
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FP16_SMALLEST = 2.0**-24  # about 6e-8
FP16_SMALLEST_NORMAL = float(torch.finfo(torch.float16).tiny)  # 2**-14, about 6.1e-5

# The run the memory sections measure: the `small` GPT, Adam, fp32, a few steps on one process.
MEMORY_RUN: dict[str, Any] = dict(
    model="small", steps=3, global_batch_size=8, optimizer="adam", eval_every=0, threads=2
)
CATEGORIES = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")


def memory_breakdown(run: RunResult) -> pd.DataFrame:
    """Rank 0's measured bytes per category, beside the model-state formula (fp32, Adam).

    Columns ``category``, ``measured_bytes`` and ``formula_bytes`` (4 bytes per parameter for
    weights and for gradients, 8 for Adam's two moments; no formula for activations, which
    depend on the batch, the sequence and what each operation saves).
    """
    mem = run.memory.iloc[0]
    n = int(run.info["n_params"])
    formula = {"params_bytes": 4 * n, "grads_bytes": 4 * n, "optimizer_bytes": 8 * n}
    return pd.DataFrame(
        {
            "category": [c.removesuffix("_bytes") for c in CATEGORIES],
            "measured_bytes": [int(mem[c]) for c in CATEGORIES],
            "formula_bytes": [formula.get(c, np.nan) for c in CATEGORIES],
        }
    )


def recompute_experiment(
    modes: Sequence[str] = ("none", "selective", "full"), repeats: int = 1, **fields: Any
) -> pd.DataFrame:
    """Train the same run once per ``recompute`` mode (``repeats`` times each, for the timing).

    One row per mode: ``activations_bytes`` (measured peak saved for backward), ``step_ms``
    (median over every step after the first, over all repeats), ``max_rel_diff`` (the largest
    relative difference of any weight from the first mode's run) and ``final_loss``.
    """
    settings = {**MEMORY_RUN, "progress": False, **fields}
    runs: dict[str, list[RunResult]] = {
        mode: [labkit.run(**settings, recompute=mode) for _ in range(repeats)] for mode in modes
    }
    reference = runs[modes[0]][0]
    rows = []
    for mode, results in runs.items():
        times = pd.concat([r.metrics[r.metrics["step"] > 0]["step_time_s"] for r in results])
        rows.append(
            {
                "recompute": mode,
                "activations_bytes": int(results[0].memory["activations_bytes"].iloc[0]),
                "step_ms": 1e3 * float(times.median()),
                "max_rel_diff": float(reference.compare(results[0])["relative_difference"].max()),
                "final_loss": float(results[0].losses.iloc[-1]),
            }
        )
    return pd.DataFrame(rows).set_index("recompute")


def precision_experiment(
    precisions: Sequence[str] = ("fp32", "bf16", "fp16"),
    seeds: Sequence[int] = (0, 1, 2),
    **fields: Any,
) -> tuple[dict[tuple[str, int], RunResult], pd.DataFrame]:
    """Train one run per (precision, seed); the runs and a summary per precision.

    The summary has ``final_loss_mean``, ``final_loss_min``, ``final_loss_max`` (over seeds, the
    mean training loss of the last 10 steps), ``step_ms`` (median over all steps after the
    first) and ``skipped`` (optimizer steps fp16's scaler skipped, over all seeds).
    """
    settings = dict(model="nano", steps=80, global_batch_size=8, eval_every=0, threads=1)
    settings.update(fields, progress=False)
    runs = {
        (p, seed): labkit.run(**settings, precision=p, seed=seed)
        for p in precisions
        for seed in seeds
    }
    rows = []
    for p in precisions:
        mine = [runs[(p, seed)] for seed in seeds]
        finals = [float(r.losses.iloc[-10:].mean()) for r in mine]
        times = pd.concat([r.metrics[r.metrics["step"] > 0]["step_time_s"] for r in mine])
        rows.append(
            {
                "precision": p,
                "final_loss_mean": float(np.mean(finals)),
                "final_loss_min": min(finals),
                "final_loss_max": max(finals),
                "step_ms": 1e3 * float(times.median()),
                "skipped": int(sum(r.info["skipped_steps"] for r in mine)),
            }
        )
    return runs, pd.DataFrame(rows).set_index("precision")


def gradient_magnitudes(model: str = "nano", batch_size: int = 8, seed: int = 0) -> np.ndarray:
    """|g| of every non-zero parameter-gradient value after one fp32 forward and backward of a
    fresh GPT on a real training batch (the loss is the mean over tokens, as in training)."""
    from labkit.config import TrainConfig
    from labkit.data import global_batch, load_corpus
    from labkit.model import lm_loss_sum
    from labkit.train import build_model

    cfg = TrainConfig(model=model, seed=seed)
    net = build_model(cfg)
    x, y = global_batch(
        load_corpus(cfg.corpus).train,
        seed=seed,
        step=0,
        batch_size=batch_size,
        block_size=net.cfg.block_size,
    )
    (lm_loss_sum(net(x), y) / y.numel()).backward()
    values = torch.cat([p.grad.abs().flatten() for p in net.parameters() if p.grad is not None])
    values = values[values > 0]
    return values.numpy()


def fp16_fate(magnitudes: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """Fractions of ``magnitudes`` (scaled by ``scale``) that fp16 flushes to zero, keeps only as
    a *subnormal* (fewer than its 10 bits of precision), keeps fully (``normal``), or turns into
    inf: what multiplying the loss by ``scale`` does to its gradients in fp16."""
    scaled = magnitudes.astype(np.float64) * scale
    zero = float(np.mean(scaled < FP16_SMALLEST / 2))
    subnormal = float(np.mean((scaled >= FP16_SMALLEST / 2) & (scaled < FP16_SMALLEST_NORMAL)))
    inf = float(np.mean(scaled > FP16_MAX))
    return {
        "flushed_to_zero": zero,
        "subnormal": subnormal,
        "normal": 1.0 - zero - subnormal - inf,
        "overflow": inf,
    }
