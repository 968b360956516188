"""Context parallelism for the notebooks: ring attention checked against dense attention.

``compare_with_dense(world_size, ...)`` runs ``labkit.parallel.ring_attention`` on
``world_size`` Gloo processes, each holding its zig-zag piece of the same random queries, keys
and values, and returns how far its output and gradients are from dense causal attention on
the whole sequence, and how many key/value bytes each rank held at once.

``train_with_cp(sizes, ...)`` trains the same run with ``TrainConfig.cp`` in ``sizes`` and
returns, per size, how far its weights are from one process and what each rank measured: the
activations saved for backward and the ring's key/value bytes sent per step.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.parallel.ring_attention import ring_attention, zigzag_shard
from labkit.progress import Progress
from labkit.supervisor import spawn

__all__ = ["compare_with_dense", "ring_bytes_formula", "ring_vs_dense_on_rank", "train_with_cp"]


def ring_vs_dense_on_rank(
    rank: int, world: int, batch: int, heads: int, seq_len: int, head_dim: int, seed: int
) -> dict[str, float]:
    """One rank's comparison (run by ``compare_with_dense`` on every process)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(4))
    dense_in = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = F.scaled_dot_product_attention(*dense_in, is_causal=True)
    dense.backward(grad)
    mine = [zigzag_shard(t, rank, world).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, group=dist.group.WORLD)
    out.backward(zigzag_shard(grad, rank, world))
    errors = {"output": (out - zigzag_shard(dense, rank, world)).abs().max()}
    for name, local, full in zip(("dq", "dk", "dv"), mine, dense_in, strict=True):
        errors[name] = (local.grad - zigzag_shard(full.grad, rank, world)).abs().max()
    row = {name: float(e) for name, e in errors.items()}
    row["kv_bytes_held"] = 2 * mine[1].numel() * mine[1].element_size()
    return row


def compare_with_dense(
    world_size: int,
    batch: int = 2,
    heads: int = 3,
    seq_len: int = 32,
    head_dim: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """Ring attention on ``world_size`` processes against dense causal attention: one row per
    rank with the largest absolute difference of the output and of each gradient."""
    rows = spawn(
        ring_vs_dense_on_rank,
        world_size,
        (batch, heads, seq_len, head_dim, seed),
        timeout_s=120.0,
    )
    return pd.DataFrame(rows).rename_axis("rank")


def ring_bytes_formula(cfg: Any) -> int:
    """Bytes a rank sends for ring attention in one training step of ``cfg`` (a TrainConfig).

    Per attention layer and micro-batch, with ``W = cp``: forward passes ``W - 1`` key/value
    pairs on; backward passes ``W - 1`` key/value pairs with their two gradients, then sends
    the gradients home: ``2(W-1) + 4(W-1) + 2 = 6W - 4`` blocks of ``rows x T/W x d_model``.
    """
    from labkit.model import PRESETS

    w = cfg.cp
    if w == 1:
        return 0
    preset = PRESETS[cfg.model]
    rows = cfg.global_batch_size // cfg.dp // cfg.grad_accum_steps
    tokens = (cfg.block_size or preset.block_size) // w
    block = rows * tokens * preset.d_model * 4  # float32, every head
    return (6 * w - 4) * block * preset.n_layer * cfg.grad_accum_steps


def train_with_cp(
    sizes: tuple[int, ...] = (1, 2, 4), progress: bool = True, **fields: Any
) -> pd.DataFrame:
    """Train one run with each context-parallel size in ``sizes`` (1 is the one-process
    reference) and compare. One row per size: ``max_rel_diff`` (largest relative difference of
    any weight from cp=1), ``activations_KiB`` (saved for backward, measured on the fullest
    rank), ``kv_sent_KiB`` (ring attention's bytes a rank sent per step, counted as they left),
    ``kv_formula_KiB`` (``ring_bytes_formula``, the prediction beside it), ``step_ms`` (median
    step time of the slowest rank, after the first step)."""
    import labkit
    from labkit.lessons.pipeline import steady_step_ms

    settings = {"model": "nano", "steps": 3, "global_batch_size": 8, **fields}
    results = {}
    with Progress(len(sizes), "cp sizes", disable=not progress) as bar:
        for i, cp in enumerate(sizes):
            extra = {"cp": cp} if cp > 1 else {}
            results[cp] = labkit.run(**settings, **extra, progress=False)
            bar.update_to(i + 1)
    reference = results[min(sizes)]
    rows = []
    for cp, result in results.items():
        m = result.metrics
        rows.append(
            {
                "cp": cp,
                "max_rel_diff": float(reference.compare(result)["relative_difference"].max()),
                "activations_KiB": result.memory["activations_bytes"].max() / 1024,
                "kv_sent_KiB": m["comm_bytes_cp"].max() / 1024,
                "kv_formula_KiB": ring_bytes_formula(result.config) / 1024,
                "step_ms": steady_step_ms(result),
            }
        )
    return pd.DataFrame(rows).set_index("cp")
