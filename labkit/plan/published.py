"""The planner against published runs: each with its source and the assumptions fed in.

A planner that agrees with the 2-process runs it was calibrated beside could still be wrong by
10x at 1,000 GPUs. These are runs other people measured at scale; ``sanity_table`` predicts
each one and reports ``predicted / published``. Where the source leaves a setting out, the
assumption is written in ``assumed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from labkit.plan.hardware import CARDS, LINKS, Cluster
from labkit.plan.predict import Prediction, predict

__all__ = ["PUBLISHED_RUNS", "PublishedRun", "sanity_table"]


@dataclass(frozen=True)
class PublishedRun:
    """A published measurement and what it takes to predict it."""

    name: str
    source: str
    config: dict[str, Any]
    cluster: Cluster
    metric: str  # "tokens_per_s_per_gpu", "mfu" or "hardware_tflops_per_gpu"
    value: float
    assumed: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _hardware_tflops(p: Prediction) -> float:
    """Achieved FLOP/s per GPU counting recomputation (Megatron's "teraFLOP/s per GPU")."""
    m = p.workload.model
    tokens = p.workload.global_batch_size * m.seq_len
    flops = tokens * (m.train_flops_per_token() + m.recompute_flops_per_token(p.workload.recompute))
    return flops / p.step_time_s / p.workload.world_size / 1e12


# torchtitan's H100s: Grand Teton hosts, 96 GB HBM2e at 2.4 TB/s, 500 W (docs/performance.md).
_H100_96 = replace(CARDS["H100"], name="H100 (96 GB, 500 W)", memory_bytes=96e9, memory_Bps=2.4e12)

PUBLISHED_RUNS: list[PublishedRun] = [
    PublishedRun(
        name="torchtitan: Llama 3.1 8B, FSDP, 8 H100",
        source="pytorch/torchtitan docs/performance.md, table 1 (FSDP, no torch.compile)",
        config=dict(
            model="llama-3.1-8b",
            global_batch_size=16,
            dp=8,
            dp_impl="fsdp",
            recompute="selective",
            precision="bf16",
        ),
        cluster=Cluster(_H100_96, 8, inter=LINKS["ib-ndr"]),
        metric="tokens_per_s_per_gpu",
        value=5762,
        assumed="sequence 8192; labkit's selective recomputation (the attention sub-layer) "
        "for torchtitan's per-op selective AC",
        notes="published peak memory 82.4 GiB",
        extra={"published_memory_GiB": 82.4},
    ),
    PublishedRun(
        name="picotron: Llama 2 7B, 64 H100",
        source="huggingface/picotron README (38% MFU on Llama-2-7B, 64 H100)",
        config=dict(
            model="llama-2-7b",
            global_batch_size=256,
            dp=8,
            tp=8,
            dp_impl="zero1",
            precision="bf16",
            grad_accum_steps=32,
        ),
        cluster=Cluster(CARDS["H100"], 64, inter=LINKS["ib-ndr"]),
        metric="mfu",
        value=0.38,
        assumed="the README gives no mesh: dp 8 x tp 8 (tp inside a node), sequence 4096, "
        "micro-batch 1, 1M-token batch, ZeRO-1, no recomputation",
    ),
    PublishedRun(
        name="Megatron-LM: 1T GPT, 3072 A100",
        source="Narayanan et al. 2021 (arXiv 2104.04473), table 1: 163 teraFLOP/s per GPU (52%)",
        config=dict(
            model="megatron-1t",
            global_batch_size=3072,
            dp=6,
            pp=64,
            tp=8,
            micro_batches=512,
            dp_impl="zero1",
            pp_schedule="interleaved-1f1b",
            pp_virtual_stages=2,
            recompute="full",
            precision="bf16",
        ),
        cluster=Cluster(CARDS["A100"], 3072, inter=LINKS["ib-hdr"]),
        metric="hardware_tflops_per_gpu",
        value=163,
        assumed="micro-batch 1, interleaved schedule with 2 chunks per rank, full recomputation "
        "(the paper counts its FLOPs, as this row does); distributed optimizer as ZeRO-1",
    ),
]


def sanity_table(runs: list[PublishedRun] | None = None) -> pd.DataFrame:
    """One row per published run: the metric, published and predicted, and their ratio."""
    rows = []
    for run in runs or PUBLISHED_RUNS:
        p = predict(run.config, run.cluster)
        predicted = {
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
            "mfu": p.mfu,
            "hardware_tflops_per_gpu": _hardware_tflops(p),
        }[run.metric]
        rows.append(
            {
                "run": run.name,
                "metric": run.metric,
                "published": run.value,
                "predicted": predicted,
                "predicted / published": predicted / run.value,
                "predicted memory (GiB)": p.peak_memory_bytes / 2**30,
                "source": run.source,
                "assumed": run.assumed,
            }
        )
    return pd.DataFrame(rows)
