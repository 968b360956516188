"""Helpers for notebook 06, parallelisms combined on one mesh (and ``labkit bench mesh``).

1. ``mesh_shapes``: every ``dp x pp x tp`` that a model allows on N ranks (TrainConfig's own
   validation decides, so the rules live in one place).
2. ``collectives_table``: for one rank of a mesh, what travels over each dimension and with whom.
3. ``compare_meshes``: train several meshes of the same world size in the *same* worker
   processes, one after the other, and measure each one: step time, parameter bytes per rank,
   bytes sent per dimension, and the largest difference from the single-process weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

import labkit
from labkit.config import TrainConfig
from labkit.launch import run_many
from labkit.parallel.mesh import group_ranks, mesh_coords
from labkit.parallel.presets import DIMS, DP_IMPLS

__all__ = ["MESH_RUN", "collectives_table", "compare_meshes", "mesh_shapes"]

# The settings notebook 06 and the benchmark share: small enough for 4 processes on 2 cores,
# with clipping, warm-up and accumulation on so the equivalence is tested on the real thing.
MESH_RUN = dict(
    model="micro",
    steps=4,
    global_batch_size=8,
    grad_accum_steps=1,
    clip="norm",
    max_norm=0.5,
    schedule="cosine",
    warmup_steps=2,
    eval_every=0,
)

# What crosses each dimension in one training step (the labels of the notebook's table).
TRAFFIC = {
    "tp": "activations and their gradients: 2 all-reduces per block, each way",
    "dp": "gradients: all-reduce (or reduce-scatter + all-gather when sharded)",
    "pp": "activations forward, their gradients back: send/recv to the next/previous stage",
    "cp": "key/value blocks of every attention layer, round the ring (send/recv)",
}


def mesh_shapes(model: str, world_size: int, **fields: Any) -> list[dict[str, int]]:
    """Every ``{"dp", "pp", "tp"}`` with product ``world_size`` that TrainConfig accepts."""
    shapes = []
    for pp in range(1, world_size + 1):
        for tp in range(1, world_size + 1):
            if world_size % (pp * tp):
                continue
            shape = {"dp": world_size // (pp * tp), "pp": pp, "tp": tp}
            extra = {"micro_batches": 2} if pp > 1 else {}
            try:
                TrainConfig(**{**MESH_RUN, **fields, **extra, "model": model}, **shape)
            except ValueError:
                continue
            shapes.append(shape)
    return shapes


def collectives_table(cfg: TrainConfig, rank: int) -> pd.DataFrame:
    """For ``rank`` of ``cfg``'s mesh: each dimension's group (its ranks) and what crosses it."""
    shape = cfg.mesh_shape
    rows = []
    for dim in reversed(DIMS):
        group = next(g for g in group_ranks(shape, (dim,)) if rank in g)
        rows.append(
            {
                "dimension": dim,
                "size": shape[dim],
                f"ranks with rank {rank}": " ".join(map(str, group)),
                "what travels": TRAFFIC[dim] if shape[dim] > 1 else "(nothing: size 1)",
            }
        )
    sharded = DP_IMPLS[cfg.dp_impl].shards_grads
    # cp ranks, like dp replicas, hold the same (averaged) gradient: not combined for the norm.
    clip_dims = tuple(d for d in DIMS if shape[d] > 1 and d != "cp" and (d != "dp" or sharded))
    group = next((g for g in group_ranks(shape, clip_dims) if rank in g), [rank])
    rows.append(
        {
            "dimension": "clip norm",
            "size": len(group),
            f"ranks with rank {rank}": " ".join(map(str, group)),
            "what travels": "one number: the squared norm of this rank's gradient pieces",
        }
    )
    return (
        pd.DataFrame(rows)
        .set_index("dimension")
        .rename_axis(f"rank {rank} at {mesh_coords(rank, shape)}")
    )


def compare_meshes(
    meshes: Sequence[dict[str, Any]],
    *,
    reference: labkit.RunResult | None = None,
    progress: bool = True,
    **fields: Any,
) -> pd.DataFrame:
    """Train each mesh (a dict of dp, pp, tp and optionally dp_impl, pp_schedule) and measure it.

    All meshes share the world size, so they run one after another in the same processes
    (``labkit.launch.run_many``). One row per mesh: ``label``, ``step_ms`` (median over the steps after
    the first, slowest rank), ``params_MiB`` (peak parameter storage of the fullest rank,
    measured), ``dp_KB``, ``pp_KB``, ``tp_KB`` (bytes the busiest rank sent per step over each
    dimension, counted where labkit calls torch.distributed) and, with a single-process
    ``reference`` of the same settings, ``max_rel_diff`` (the largest relative difference of
    any weight).
    """
    settings = {**MESH_RUN, "progress": False, **fields}
    configs = []
    for mesh in meshes:
        extra = {"micro_batches": 2} if mesh.get("pp", 1) > 1 else {}
        configs.append(TrainConfig(**{**settings, **extra, **mesh}))
    results = run_many(configs, progress=progress, desc="meshes")
    rows = []
    for cfg, result in zip(configs, results, strict=True):
        m = result.metrics
        steady = m[m["step"] > m["step"].min()] if m["step"].nunique() > 1 else m
        per_rank = steady.groupby("rank")
        row = {
            "label": cfg.label,
            "step_ms": 1e3 * result.steady_step_s(),
            "params_MiB": result.memory["peak_params_bytes"].max() / 2**20,
        }
        for dim in ("dp", "pp", "tp"):
            row[f"{dim}_KB"] = per_rank[f"comm_bytes_{dim}"].median().max() / 1e3
        if reference is not None:
            row["max_rel_diff"] = float(reference.compare(result)["relative_difference"].max())
        row["result"] = result
        rows.append(row)
    return pd.DataFrame(rows).set_index("label")
