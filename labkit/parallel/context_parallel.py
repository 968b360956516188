"""Context parallelism: the ranks of a cp group share every sequence, each holding a piece of it.

Long contexts make activations, not weights, the memory that runs out: every layer keeps
``batch x tokens x width`` numbers for backward. Context parallelism (the ``cp`` dimension of
the mesh) cuts each sequence across ``cp`` ranks, so each keeps ``1/cp`` of them:

- **The data.** Every rank of a cp group reads the same batch rows (its dp replica's) and keeps
  its zig-zag piece of each sequence: chunks ``r`` and ``2 cp - 1 - r`` of ``2 cp``, one early
  and one late, so that under the causal mask every rank has the same attention work
  (``labkit.parallel.ring_attention.zigzag_positions``). Targets are cut the same way.
- **The model.** Everything but attention acts on each token by itself, so it runs unchanged on
  the piece; the position embedding looks up the piece's true positions. Attention needs every
  earlier token and runs as ring attention over the cp group.
- **The gradients.** Each rank's gradient covers its tokens only. Summed over the cp ranks and
  the dp replicas they make the batch's gradient, so data parallelism simply averages over the
  ``dp x cp`` ranks (torchtitan's flattened ``dp_cp`` mesh) and the loss is scaled by
  ``dp x cp / n_tokens``. After that every cp rank holds the same gradient: clipping counts it
  once, like a dp replica's.

This file changes the model in place (parameter names and the state dict stay the GPT's); the
strategy (``labkit.parallel.base``) cuts each batch with ``shard_sequences``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from labkit.model import GPT
from labkit.parallel.ring_attention import ring_attention, zigzag_positions, zigzag_shard

__all__ = ["apply_context_parallel", "shard_sequences"]


def shard_sequences(
    x: torch.Tensor, y: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s zig-zag piece of every sequence of inputs ``x`` and targets ``y`` ([B, T])."""
    return zigzag_shard(x, rank, world, dim=1), zigzag_shard(y, rank, world, dim=1)


def _positions(n_local: int, device: torch.device, *, rank: int, world: int) -> torch.Tensor:
    """The sequence positions of the ``n_local`` tokens this rank holds."""
    return zigzag_positions(n_local * world, rank, world, device)


def apply_context_parallel(model: GPT, group: Any, on_send: Any = None) -> None:
    """Make ``model`` run on this rank's zig-zag piece of each sequence (in place).

    The embedding looks up the piece's positions; every attention layer runs ring attention
    over ``group``. ``on_send(nbytes)`` hears the key/value bytes each ring step sends.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model.embed.positions = partial(_positions, rank=rank, world=world)
    for block in model.blocks:
        block.attn.core = partial(ring_attention, group=group, on_send=on_send)
