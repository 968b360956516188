"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): every weight matrix split across ranks.

Read this file top to bottom:

1. **f and g**, two autograd operators that are each other's mirror image.
   ``f`` (``copy_to_parallel``) is the identity going forward and an all-reduce going backward;
   ``g`` (``reduce_from_parallel``) is an all-reduce going forward and the identity backward.
2. **ColumnParallelLinear** holds some *output* rows of a dense ``nn.Linear``: each rank computes
   its slice of the output features from the whole input. **RowParallelLinear** holds some
   *input* columns: each rank multiplies its slice of the input features, and ``g`` sums the
   partial products. Column then row needs no communication in between, and one all-reduce at
   the end (plus one, in ``f``, for the input gradient in backward). Both are built by slicing
   a dense layer, so the shards together *are* the dense parameters.
3. **ParallelAttention** splits the heads across ranks (q, k, v column-parallel, so each rank
   gets whole heads; the output projection row-parallel); **ParallelMLP** is fc column-parallel,
   proj row-parallel. Embeddings, layer norms and the head are replicated (not vocab-parallel):
   every rank computes them identically on the full batch.
4. ``TensorParallelStrategy`` (``"tp"``): every rank consumes the full batch and computes the
   same loss. Clipping needs care: the global norm counts sharded parameters summed across ranks
   but replicated ones *once*, and replicated gradients must stay identical everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from labkit.clip import global_grad_norm
from labkit.data import shard_rows
from labkit.model import MLP, Attention
from labkit.parallel.base import Strategy, ring_bytes

# The clip methods that are exact under tensor parallelism. AGC is not: it clips each output
# row of a weight by that row's norm, and a row-parallel weight's rows are split across ranks.
TP_CLIP_METHODS = ("none", "norm", "value", "autoclip", "zclip")

# Called after every all-reduce with (tensor, start perf_counter, end perf_counter).
CommHook = Callable[[torch.Tensor, float, float], None]


def _all_reduce_(tensor: torch.Tensor, group: Any, on_comm: CommHook | None) -> torch.Tensor:
    start = time.perf_counter()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    if on_comm is not None:
        on_comm(tensor, start, time.perf_counter())
    return tensor


# ---------------------------------------------------------------------------------------------
# 1. The conjugate operators f and g
# ---------------------------------------------------------------------------------------------


class CopyToParallel(torch.autograd.Function):
    """``f``: identity forward, all-reduce (sum) backward.

    It sits where a replicated activation enters the parallel region. Each rank's slice of the
    layer contributes a *partial* gradient to that activation; the true gradient is their sum.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, on_comm: CommHook | None) -> torch.Tensor:
        ctx.group, ctx.on_comm = group, on_comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Clone: autograd may hand the same gradient buffer to another branch of the graph.
        return _all_reduce_(grad.contiguous().clone(), ctx.group, ctx.on_comm), None, None


class ReduceFromParallel(torch.autograd.Function):
    """``g``: all-reduce (sum) forward, identity backward.

    It sits where the parallel region ends: the partial outputs of a row-parallel layer are
    summed into the full, replicated output. Its gradient is the same on every rank already.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, on_comm: CommHook | None) -> torch.Tensor:
        ctx.mark_dirty(x)  # reduced in place: x is a fresh matmul output nobody else reads
        return _all_reduce_(x, group, on_comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def copy_to_parallel(
    x: torch.Tensor, group: Any = None, on_comm: CommHook | None = None
) -> torch.Tensor:
    """``f``: identity forward, all-reduce backward."""
    return CopyToParallel.apply(x, group, on_comm)


def reduce_from_parallel(
    x: torch.Tensor, group: Any = None, on_comm: CommHook | None = None
) -> torch.Tensor:
    """``g``: all-reduce forward, identity backward."""
    return ReduceFromParallel.apply(x, group, on_comm)


# ---------------------------------------------------------------------------------------------
# 2. Column- and row-parallel linear layers
# ---------------------------------------------------------------------------------------------


def _my_slice(size: int, group: Any, what: str) -> slice:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if size % world:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size {world}")
    return shard_rows(size, rank, world)


def _shard(t: torch.Tensor, index: Any, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach()[index].clone(), requires_grad=like.requires_grad)


class ColumnParallelLinear(nn.Module):
    """This rank's block of *output* rows of a dense ``nn.Linear``: ``y_r = x W_r^T + b_r``.

    Args:
        dense: the layer to split; this rank keeps rows ``rank*out/p .. (rank+1)*out/p``.
        group: the tensor-parallel process group (None: the default group).
        copy_input: apply ``f`` to the input. Pass False when the caller applied it once for
            several column-parallel layers reading the same input (q, k and v), so that their
            input gradients are summed locally first and all-reduced once.
        on_comm: called after each all-reduce (for timing and byte counts).
    """

    shard_dims = {"weight": 0, "bias": 0}  # the dimension each parameter is split along

    def __init__(
        self,
        dense: nn.Linear,
        group: Any = None,
        *,
        copy_input: bool = True,
        on_comm: CommHook | None = None,
    ) -> None:
        super().__init__()
        rows = _my_slice(dense.out_features, group, "out_features")
        self.group, self.copy_input, self.on_comm = group, copy_input, on_comm
        self.weight = _shard(dense.weight, rows, dense.weight)
        if dense.bias is not None:
            self.bias = _shard(dense.bias, rows, dense.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_parallel(x, self.group, self.on_comm)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's block of *input* columns of a dense ``nn.Linear``: ``y = g(x_r W_r^T) + b``.

    The input is already split along its features (the output of a column-parallel layer).
    The bias is replicated and added once, after the sum.
    """

    shard_dims = {"weight": 1}

    def __init__(
        self, dense: nn.Linear, group: Any = None, *, on_comm: CommHook | None = None
    ) -> None:
        super().__init__()
        cols = _my_slice(dense.in_features, group, "in_features")
        self.group, self.on_comm = group, on_comm
        self.weight = _shard(dense.weight, (slice(None), cols), dense.weight)
        if dense.bias is not None:
            self.bias = _shard(dense.bias, slice(None), dense.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.group, self.on_comm)
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------------------------------
# 3. Attention and MLP with their matrices split
# ---------------------------------------------------------------------------------------------


class ParallelAttention(nn.Module):
    """Causal self-attention with this rank's ``n_head / p`` heads; same parameter names."""

    def __init__(self, attn: Attention, group: Any = None, on_comm: CommHook | None = None):
        super().__init__()
        world = dist.get_world_size(group)
        if attn.n_head % world:
            raise ValueError(f"n_head={attn.n_head} is not divisible by the tp size {world}")
        self.n_head = attn.n_head // world  # heads on this rank
        self.group, self.on_comm = group, on_comm
        # Head h is rows h*head_dim .. (h+1)*head_dim of q, k and v, so a block of rows is a
        # block of whole heads: attention itself needs no communication.
        self.q = ColumnParallelLinear(attn.q, group, copy_input=False, on_comm=on_comm)
        self.k = ColumnParallelLinear(attn.k, group, copy_input=False, on_comm=on_comm)
        self.v = ColumnParallelLinear(attn.v, group, copy_input=False, on_comm=on_comm)
        self.proj = RowParallelLinear(attn.proj, group, on_comm=on_comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = copy_to_parallel(x, self.group, self.on_comm)  # one f for q, k and v together

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_head, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class ParallelMLP(nn.Module):
    """fc column-parallel (each rank a slice of the 4d hidden units), proj row-parallel."""

    def __init__(self, mlp: MLP, group: Any = None, on_comm: CommHook | None = None) -> None:
        super().__init__()
        self.fc = ColumnParallelLinear(mlp.fc, group, on_comm=on_comm)
        self.proj = RowParallelLinear(mlp.proj, group, on_comm=on_comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU acts element-wise, so it applies to each rank's hidden slice independently.
        return self.proj(F.gelu(self.fc(x)))


# ---------------------------------------------------------------------------------------------
# 4. The strategy
# ---------------------------------------------------------------------------------------------


class TensorParallelStrategy(Strategy):
    """``tp``: attention and MLP split across all ranks; everything else replicated.

    Every rank trains on the whole batch and sees the same loss. ``comm_bytes`` counts what a
    ring all-reduce sends per rank, ``2 (p-1)/p`` times the tensor's bytes. The "allreduce"
    timeline events are nested inside the forward and backward events that issue them.
    """

    nested_comm = True  # the all-reduces block inside forward and backward

    name = "tp"

    def setup(self) -> None:
        """Swap each block's attention and MLP for their parallel versions."""
        self.group = dist.group.WORLD
        self.tp_size, self.tp_rank = dist.get_world_size(), dist.get_rank()
        self.full_keys = list(self.module.state_dict())
        self._step, self._recording = 0, True
        for block in self.module.blocks:
            block.attn = ParallelAttention(block.attn, self.group, self._on_comm)
            block.mlp = ParallelMLP(block.mlp, self.group, self._on_comm)
        # name -> dimension it is split along, for every sharded parameter
        self.shard_dims: dict[str, int] = {
            f"{module_name}.{param_name}": dim
            for module_name, module in self.module.named_modules()
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
            for param_name, dim in module.shard_dims.items()
            if getattr(module, param_name) is not None
        }
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.sharded = [p for n, p in named if n in self.shard_dims]
        self.replicated = [p for n, p in named if n not in self.shard_dims]
        self.clip_group = self.group

    def _on_comm(self, tensor: torch.Tensor, start: float, end: float) -> None:
        if not self._recording:
            return
        nbytes = tensor.numel() * tensor.element_size()
        self.comm_bytes += ring_bytes(nbytes, self.tp_size, "allreduce")
        t0 = self.timeline.t0
        self.timeline.add("allreduce", self._step, -1, start - t0, end - t0)

    def forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], n_tokens: int, step: int
    ) -> torch.Tensor:
        """The single-process loop: the all-reduces happen inside the layers."""
        self._step = step
        return super().forward_backward(micro_batches, n_tokens, step)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Validation loss (every rank computes it in full); its all-reduces are not recorded."""
        self._recording = False
        try:
            return super().evaluate(batches)
        finally:
            self._recording = True

    # ------------------------------------------------------------------ clipping
    def _norm_params(self) -> list[nn.Parameter]:
        """Parameters whose gradients make up the global norm when combined over the group.

        Every rank contributes its shards; the replicated parameters (the same on every rank)
        are contributed by rank 0 only, so they are counted once.
        """
        return self.sharded + (self.replicated if self.tp_rank == 0 else [])

    def clip_gradients(self, clipper: Any) -> torch.Tensor:
        """Clip by the global norm: shards summed across ranks, replicated parameters once.

        The clipper runs on ``_norm_params()``, so on ranks other than 0 it leaves the
        replicated gradients alone; those are then copied from rank 0, which keeps every
        replica identical (needed anyway: they must take identical optimizer steps).
        """
        if clipper.method not in TP_CLIP_METHODS:
            raise ValueError(
                f"TrainConfig.clip={clipper.method!r} is not supported with strategy='tp': "
                f"allowed: {', '.join(repr(m) for m in TP_CLIP_METHODS)}"
            )
        norm = clipper(self._norm_params(), group=self.group)
        if clipper.method != "none":
            self._broadcast_replicated_grads()
        return norm

    def _broadcast_replicated_grads(self) -> None:
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not grads or self.tp_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one message instead of dozens
        dist.broadcast(flat, src=0, group=self.group)
        if self.tp_rank == 0:
            self.comm_bytes += flat.numel() * flat.element_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_norm(self) -> torch.Tensor:
        """Global 2-norm of the current gradients, replicated parameters counted once."""
        return global_grad_norm(self._norm_params(), group=self.group)

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The dense GPT's state dict on rank 0: each sharded tensor's pieces concatenated."""
        state = self.module.state_dict()
        full: dict[str, torch.Tensor] = {}
        for key in self.full_keys:
            tensor = state[key].detach().contiguous()
            if key in self.shard_dims:
                pieces = [torch.empty_like(tensor) for _ in range(self.tp_size)]
                dist.all_gather(pieces, tensor, group=self.group)
                tensor = torch.cat(pieces, dim=self.shard_dims[key])
            full[key] = tensor.cpu().clone()
        return full if self.tp_rank == 0 else None
