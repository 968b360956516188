"""``search``: every mesh of a cluster, ranked the Ultra-Scale Playbook's way.

First **fit** (memory per GPU within the card, trying recomputation when it does not), then the
**batch** (the global batch is given; each mesh tries micro-batches of 1, 2 and 4 sequences,
reaching it by pipeline micro-batches or gradient accumulation), then **throughput**: the meshes
that fit, fastest first.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from labkit.plan.hardware import Cluster
from labkit.plan.predict import predict
from labkit.plan.shapes import PUBLISHED, ModelShape

__all__ = ["search"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    model: str | ModelShape,
    cluster: Cluster,
    global_batch: int,
    *,
    dp_impls: tuple[str, ...] = ("ddp", "zero1", "fsdp"),
    recompute: tuple[str, ...] = ("none", "selective", "full"),
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
    max_pp: int = 32,
    precision: str = "bf16",
    top: int | None = 20,
    **fields: Any,
) -> pd.DataFrame:
    """Rank the meshes of ``cluster`` for ``model`` at ``global_batch`` sequences per step.

    One row per (mesh, dp flavour, recomputation, micro-batch size) that divides the model and
    the batch; ``fits`` says whether it fits in the card's memory. Rows that fit come first,
    fastest first (``tokens_per_s_per_gpu``), then the others, smallest memory first; ``top`` keeps that many (None: all). For each
    mesh only the least recomputation that fits is kept (recomputing more only costs time).
    """
    shape = PUBLISHED[model] if isinstance(model, str) and model in PUBLISHED else model
    n = cluster.n_gpus
    rows = []
    for tp in _divisors(min(n, cluster.gpus_per_node)):
        for pp in [p for p in _divisors(n // tp) if p <= max_pp]:
            dp = n // (tp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            for impl in dp_impls if dp > 1 else ("ddp",):
                for mbs in micro_batch_sizes:
                    if per_rank % mbs:
                        continue
                    micro = per_rank // mbs
                    if pp > 1 and micro < pp:
                        continue
                    mesh = dict(dp=dp, pp=pp, tp=tp, dp_impl=impl, precision=precision)
                    mesh |= dict(micro_batches=micro) if pp > 1 else dict(grad_accum_steps=micro)
                    for rc in recompute:
                        try:
                            p = predict(
                                dict(
                                    model=shape,
                                    global_batch_size=global_batch,
                                    **mesh,
                                    recompute=rc,
                                    **fields,
                                ),
                                cluster,
                            )
                        except ValueError:
                            break  # the mesh does not divide the model: no recompute helps
                        row = p.row() | {"dp": dp, "pp": pp, "tp": tp, "dp_impl": impl}
                        row |= {"recompute": rc, "micro_batch_size": mbs, "prediction": p}
                        rows.append(row)
                        if p.fits:
                            break  # the least recomputation that fits
    if not rows:
        raise ValueError(f"search: no mesh of {n} GPUs divides the model and batch {global_batch}")
    table = pd.DataFrame(rows)
    # Those that fit, fastest first; then those that do not, the nearest to fitting first.
    table["_key"] = table["tokens_per_s_per_gpu"].where(table["fits"], -table["peak_memory_GiB"])
    table = table.sort_values(["fits", "_key"], ascending=[False, False], kind="stable")
    table = table.drop(columns="_key")
    table = table.reset_index(drop=True)
    return table.head(top) if top else table
