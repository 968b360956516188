"""Context parallelism for the notebooks: ring attention checked against dense attention.

``compare_with_dense(world_size, ...)`` runs ``labkit.parallel.ring_attention`` on
``world_size`` Gloo processes, each holding its zig-zag piece of the same random queries, keys
and values, and returns how far its output and gradients are from dense causal attention on
the whole sequence, and how many key/value bytes each rank held at once.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.parallel.ring_attention import ring_attention, zigzag_shard
from labkit.supervisor import spawn

__all__ = ["compare_with_dense", "ring_vs_dense_on_rank"]


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
