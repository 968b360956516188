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
4. ``apply_tensor_parallel`` swaps them into a GPT (or a pipeline stage of one). The ranks of a
   tp group consume the same rows and compute the same loss. Clipping needs care: the global
   norm counts sharded parameters summed across ranks but replicated ones *once*
   (``labkit.parallel.base.Strategy.clip_pieces``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from labkit.data import shard_rows
from labkit.model import MLP, Attention

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
# 4. Putting it in a GPT
# ---------------------------------------------------------------------------------------------


def apply_tensor_parallel(
    model: nn.Module, group: Any = None, on_comm: CommHook | None = None
) -> dict[str, int]:
    """Swap every block's attention and MLP for this rank's slices, in place.

    Blocks a pipeline stage does not hold (``nn.Identity`` placeholders) are skipped. Returns
    the sharded parameters' names and the dimension each is split along; every other
    parameter (embeddings, layer norms, row-parallel biases, the head) is replicated: every
    rank of ``group`` computes it identically on the full batch, so its gradient is the same
    everywhere and enters the global clipping norm once (see ``Strategy.clip_pieces``).
    """
    for block in getattr(model, "blocks", []):
        if isinstance(getattr(block, "attn", None), Attention):
            block.attn = ParallelAttention(block.attn, group, on_comm)
            block.mlp = ParallelMLP(block.mlp, group, on_comm)
    return {
        f"{module_name}.{param_name}": dim
        for module_name, module in model.named_modules()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        for param_name, dim in module.shard_dims.items()
        if getattr(module, param_name) is not None
    }
