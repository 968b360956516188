"""Ring attention: causal attention over a sequence split across the ranks of a group.

Context parallelism gives each of ``W`` ranks a piece of every sequence. Attention needs every
earlier key of a query, so the key/value pieces travel round the ring: at step ``s`` a rank
holds the piece of rank ``rank - s`` and passes it on to ``rank + 1`` while it computes, and
after ``W`` steps it has seen them all without ever holding the whole sequence.

Read this file top to bottom:

1. **The zig-zag split.** Under a causal mask the early tokens attend to little and the late
   ones to a lot, so contiguous pieces would leave rank 0 idle. The sequence is cut into
   ``2W`` chunks and rank ``r`` takes chunks ``r`` and ``2W - 1 - r``: one early, one late,
   the same work on every rank (Megatron-LM's and torchtitan's load balancing).
2. **Online softmax.** A query's softmax over all keys is built block by block: keep the running
   maximum ``m``, the running sum ``l`` of ``exp(score - m)`` and the running weighted values;
   rescale them by ``exp(m_old - m_new)`` whenever the maximum grows (Milakov & Gimelshein 2018,
   the trick FlashAttention is built on). The result equals the dense softmax exactly in
   real arithmetic.
3. **Backward**, by hand: the same ring again, recomputing each block's probabilities from the
   saved log-sum-exp. A block's key and value gradients travel with the block and arrive back
   at their owner after ``W`` steps.

Communication is non-blocking (``isend``/``irecv``) so that each step's transfer overlaps the
step's arithmetic; every message carries a tag naming the step and the tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ring_attention", "zigzag_positions", "zigzag_shard"]


# ---------------------------------------------------------------------------------------------
# 1. The zig-zag split
# ---------------------------------------------------------------------------------------------


def zigzag_positions(seq_len: int, rank: int, world: int, device: Any = None) -> torch.Tensor:
    """The global positions of rank ``rank``'s tokens: chunks ``rank`` and ``2W - 1 - rank``."""
    if seq_len % (2 * world):
        raise ValueError(
            f"a sequence of {seq_len} tokens does not cut into 2 x {world} equal chunks "
            f"(context parallelism over {world} ranks needs a multiple of {2 * world})"
        )
    c = seq_len // (2 * world)
    late = 2 * world - 1 - rank
    return torch.cat(
        [
            torch.arange(rank * c, (rank + 1) * c, device=device),
            torch.arange(late * c, (late + 1) * c, device=device),
        ]
    )


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = -2) -> torch.Tensor:
    """Rank ``rank``'s zig-zag piece of ``x`` along ``dim`` (the sequence dimension)."""
    positions = zigzag_positions(x.shape[dim], rank, world, x.device)
    return x.index_select(dim, positions)


# ---------------------------------------------------------------------------------------------
# 2. and 3. The ring, forward and backward
# ---------------------------------------------------------------------------------------------


class _Ring:
    """Who sends to whom in the group, and one step's transfers."""

    def __init__(self, group: Any, on_send: Any = None) -> None:
        self.group = group
        self.on_send = on_send  # called with the bytes each step sends (the trainer counts them)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

        def global_rank(i: int) -> int:
            return i if group is None else dist.get_global_rank(group, i)

        self.next = global_rank((self.rank + 1) % self.world)
        self.prev = global_rank((self.rank - 1) % self.world)

    def start(self, tensors: list[torch.Tensor], step: int) -> tuple[list, list[torch.Tensor]]:
        """Post the sends of ``tensors`` (at most 4) to the next rank and the receives from the
        previous; tags ``4 * step + i`` keep each step's messages apart."""
        works, received = [], []
        for i, t in enumerate(tensors):
            tag = 4 * step + i
            t = t.contiguous()  # a head split is a transposed view; Gloo sends flat memory
            buffer = torch.empty_like(t)
            works.append(dist.isend(t, self.next, group=self.group, tag=tag))
            works.append(dist.irecv(buffer, self.prev, group=self.group, tag=tag))
            received.append(buffer)
        if self.on_send is not None:
            self.on_send(sum(t.numel() * t.element_size() for t in tensors))
        return works, received

    @staticmethod
    def finish(works: list) -> None:
        for work in works:
            work.wait()


def _scores(
    q: torch.Tensor, k: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scaled scores of ``q`` against one key block, ``-inf`` where the causal mask hides them."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, on_send: Any
    ) -> torch.Tensor:
        ring = _Ring(group, on_send)
        scale = q.shape[-1] ** -0.5
        seq_len = q.shape[-2] * ring.world
        pos_q = zigzag_positions(seq_len, ring.rank, ring.world, q.device)
        m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros_like(m)  # noqa: E741 (the paper's name)
        acc = torch.zeros_like(q)
        kk, vv = k, v
        for s in range(ring.world):
            if s < ring.world - 1:  # the last block needs no onward pass
                works, (next_k, next_v) = ring.start([kk, vv], s)
            src = (ring.rank - s) % ring.world
            pos_k = zigzag_positions(seq_len, src, ring.world, q.device)
            scores = _scores(q, kk, pos_q, pos_k, scale)
            # Step 0 is this rank's own block, which holds every query's own position, so m is
            # finite from then on and no row ever computes exp(-inf - -inf).
            new_m = torch.maximum(m, scores.amax(-1))
            p = torch.exp(scores - new_m[..., None])
            correction = torch.exp(m - new_m)
            l = l * correction + p.sum(-1)  # noqa: E741
            acc = acc * correction[..., None] + p @ vv
            m = new_m
            if s < ring.world - 1:
                ring.finish(works)
                kk, vv = next_k, next_v
        out = acc / l[..., None]
        ctx.save_for_backward(q, k, v, out, m + torch.log(l))
        ctx.group, ctx.scale, ctx.on_send = group, scale, on_send
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = _Ring(ctx.group, ctx.on_send), ctx.scale
        seq_len = q.shape[-2] * ring.world
        pos_q = zigzag_positions(seq_len, ring.rank, ring.world, q.device)
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO * O), FlashAttention's D
        dq = torch.zeros_like(q)
        kk, vv = k, v
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for s in range(ring.world):
            src = (ring.rank - s) % ring.world
            pos_k = zigzag_positions(seq_len, src, ring.world, q.device)
            p = torch.exp(_scores(q, kk, pos_q, pos_k, scale) - lse[..., None])
            dv = dv + p.transpose(-1, -2) @ grad_out
            ds = p * (grad_out @ vv.transpose(-1, -2) - delta)
            dq = dq + (ds @ kk) * scale
            dk = dk + (ds.transpose(-1, -2) @ q) * scale
            # The block's gradients go on with it; after the last step only they travel, home.
            last = s == ring.world - 1
            works, received = ring.start([dk, dv] if last else [kk, vv, dk, dv], s)
            ring.finish(works)
            if last:
                dk, dv = received
            else:
                kk, vv, dk, dv = received
        return dq, dk, dv, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Any = None,
    on_send: Any = None,
) -> torch.Tensor:
    """Causal attention of this rank's zig-zag piece of the queries against the whole sequence.

    ``q, k, v``: ``[batch, heads, T / W, head_dim]``, this rank's piece (``zigzag_shard``) of a
    sequence split over the ``W`` ranks of ``group``. Returns this rank's piece of the output of
    dense causal attention (``F.scaled_dot_product_attention(..., is_causal=True)``), with
    gradients flowing back to all three. A collective: every rank of ``group`` must call it.
    ``on_send(nbytes)``, if given, hears the bytes this rank sends at each ring step.
    """
    if dist.get_world_size(group) == 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _RingAttention.apply(q, k, v, group, on_send)
