"""Sharding the training state across data-parallel ranks: ZeRO-1 and FSDP (ZeRO-3).

Plain data parallelism keeps a full copy of everything on every rank: in fp32 with Adam that is
4 bytes per parameter for the weights, 4 for the gradients and 8 for Adam's two moments, 16 in
all. ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models") notices that the ranks hold *identical* copies and shards them instead:

==========  =========================  =====================================================
stage       sharded across N ranks     bytes per rank (fp32, Adam; Psi = parameter count)
==========  =========================  =====================================================
DP          nothing                    (4 + 4 + 8) Psi
ZeRO-1      optimizer state            (4 + 4 + 8/N) Psi          ``ShardedOptimizer`` here
ZeRO-2      + gradients                (4 + (4 + 8)/N) Psi        ``labkit.parallel.sharded``
ZeRO-3      + parameters               16 Psi / N                 ``sharded``; torch FSDP2 here
==========  =========================  =====================================================

This file has, top to bottom:

1. ``ShardedOptimizer``: ZeRO stage 1 as a ``torch.optim.Optimizer``. Each rank owns a subset of
   the parameters, keeps optimizer state for those only, updates them, and broadcasts them.
2. ``Zero1Strategy`` (``zero1``): bucketed gradient averaging plus ``ShardedOptimizer``.
3. ``FSDPStrategy`` (``fsdp``): torch's FSDP2, each transformer block and the root sharded.

ZeRO-2 and ZeRO-3 by hand are in ``labkit.parallel.sharded``; the paper's memory formulas and
the measured bytes per rank, for the notebooks, in ``labkit.lessons.memory``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.memory import storage_bytes, storage_ids
from labkit.parallel.base import ring_bytes
from labkit.parallel.data_parallel import BucketedDPStrategy, DataParallelStrategy, broadcast_module

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "FSDPStrategy",
    "ShardedOptimizer",
    "Zero1Strategy",
    "partition_by_size",
]


# ---------------------------------------------------------------------------------------------
# 1. ZeRO-1: the sharded optimizer
# ---------------------------------------------------------------------------------------------


def partition_by_size(sizes: list[int], n_ranks: int) -> list[int]:
    """Owner rank of each item: largest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same partition without talking to the others.
    """
    owners = [0] * len(sizes)
    load = [0] * n_ranks
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(n_ranks), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1: each rank keeps the optimizer state of its own shard of the parameters.

    ``ShardedOptimizer(params, optimizer_cls, group=None, **optimizer_kwargs)`` splits the
    parameters among the ranks of ``group`` (greedily by size) and builds an ``optimizer_cls``
    over this rank's share only, so Adam's moments take ``1/N`` of the memory. ``step()`` updates
    the owned parameters with the (already averaged) gradients, then every owner broadcasts its
    updated parameters to the other ranks. With the same gradients on every rank the parameters
    end up exactly as ``optimizer_cls`` alone would leave them.

    To make that broadcast one message per rank, each rank's parameters are moved into one flat
    buffer on construction (``p.data`` becomes a view of it, as torch's
    ``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)`` does): build it after the model
    is on its device, and do not re-create the parameters afterwards.

    ``param_groups`` hold every parameter and every hyper-parameter: an LR scheduler sets
    ``param_groups[i]["lr"]`` here and ``step()`` hands it to the inner optimizer.
    ``state_dict()`` is this rank's shard (one file per rank; resume with the same world size).
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_cls: type[torch.optim.Optimizer],
        group: ProcessGroup | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        self._ready = False
        super().__init__(params, dict(optimizer_kwargs))
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # A context manager factory wrapped around the parameter exchange (the training loop
        # uses it to time the broadcast); None: no timing.
        self.exchange_span: Callable[[], AbstractContextManager[Any]] | None = None

        everything = [p for g in self.param_groups for p in g["params"]]
        kinds = {(p.dtype, p.device) for p in everything}
        if len(kinds) > 1:
            raise ValueError(
                f"ShardedOptimizer needs all parameters on one device with one dtype, got {kinds}"
            )
        self.owners = partition_by_size([p.numel() for p in everything], self.world_size)
        owner_of = {id(p): r for p, r in zip(everything, self.owners, strict=True)}
        self.shards = self._flatten_into_shards(everything)
        # The inner optimizer sees only this rank's parameters, group by group, with the same
        # hyper-parameters. (A group may be empty on a rank: that is allowed.)
        self.optim = optimizer_cls(
            [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [p for p in g["params"] if owner_of[id(p)] == self.rank],
                }
                for g in self.param_groups
            ],
            **optimizer_kwargs,
        )
        # Show the inner optimizer's defaults (lr, betas, ...) in our groups too, so that
        # param_groups[0]["lr"] exists even when lr was left to optimizer_cls's default.
        for outer, inner in zip(self.param_groups, self.optim.param_groups, strict=True):
            for key, value in inner.items():
                if key != "params":
                    outer.setdefault(key, value)
        self._ready = True

    @torch.no_grad()
    def _flatten_into_shards(self, everything: list[torch.Tensor]) -> list[torch.Tensor]:
        """One flat buffer per rank holding its parameters; the parameters become views of it."""
        shards = []
        for rank in range(self.world_size):
            mine = [p for p, owner in zip(everything, self.owners, strict=True) if owner == rank]
            like = everything[0] if everything else torch.empty(0)
            flat = torch.empty(sum(p.numel() for p in mine), dtype=like.dtype, device=like.device)
            offset = 0
            for p in mine:
                view = flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
            shards.append(flat)
        return shards

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the partition is fixed once it is made."""
        if getattr(self, "_ready", False):
            raise NotImplementedError("ShardedOptimizer cannot take new parameter groups")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update this rank's shard with the inner optimizer, then exchange the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The scheduler wrote into *our* param_groups: pass every hyper-parameter on.
        for outer, inner in zip(self.param_groups, self.optim.param_groups, strict=True):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value
        self.optim.step()
        with self.exchange_span() if self.exchange_span else nullcontext():
            self.exchange_parameters()
        return loss

    @torch.no_grad()
    def exchange_parameters(self) -> None:
        """Every owner broadcasts its flat shard; afterwards all ranks hold every parameter."""
        works = [
            dist.broadcast(flat, group=self.group, group_src=rank, async_op=True)
            for rank, flat in enumerate(self.shards)
            if flat.numel()
        ]
        for work in works:
            work.wait()

    @property
    def param_bytes(self) -> int:
        """Bytes of parameters one exchange broadcasts (all shards together)."""
        return sum(flat.numel() * flat.element_size() for flat in self.shards)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the inner optimizer's state plus the shared hyper-parameters."""
        return {
            "shard": self.optim.state_dict(),
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.param_groups
            ],
            "rank": self.rank,
            "world_size": self.world_size,
            "owners": list(self.owners),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a shard saved by ``state_dict()`` on the same rank of the same partition."""
        if state_dict["world_size"] != self.world_size or state_dict["owners"] != self.owners:
            raise ValueError(
                f"ShardedOptimizer.load_state_dict: the state was saved with world_size="
                f"{state_dict['world_size']} and another partition of the parameters; "
                f"this optimizer has world_size={self.world_size}"
            )
        if state_dict["rank"] != self.rank:
            raise ValueError(
                f"ShardedOptimizer.load_state_dict: rank {self.rank} got rank "
                f"{state_dict['rank']}'s shard"
            )
        self.optim.load_state_dict(state_dict["shard"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)


# ---------------------------------------------------------------------------------------------
# 2. The zero1 strategy
# ---------------------------------------------------------------------------------------------


class Zero1Strategy(BucketedDPStrategy):
    """``zero1``: gradients averaged in buckets (as ``dp-bucketed``), optimizer state sharded.

    Clipping is *replicated*: after the all-reduce every rank holds the full averaged gradient
    (ZeRO-1 shards only the optimizer state), so each rank computes the same global norm locally
    with no extra communication (``clip_group`` stays None). The parameter broadcast after the
    optimizer step appears as ``broadcast`` spans, and ``comm_bytes`` counts gradient bytes
    all-reduced plus parameter bytes exchanged, as a ring sends them (``ring_bytes``).
    """

    name = "zero1"

    def make_optimizer(self) -> torch.optim.Optimizer:
        """A ``ShardedOptimizer`` around the configured optimizer."""
        cls, kwargs = self.cfg.optimizer_spec()
        self.optimizer = ShardedOptimizer(
            self.trainable_parameters(), cls, group=self.dp_group, **kwargs
        )
        self.optimizer.exchange_span = self._exchange_span
        self._step = 0
        return self.optimizer

    def finish_grad_sync(self, step: int) -> None:
        """Average the gradients (remembering the step for the broadcast's span)."""
        self._step = step
        super().finish_grad_sync(step)

    @contextmanager
    def _exchange_span(self) -> Iterator[None]:
        with self.timeline.span("broadcast", self._step):
            yield
        # Each rank broadcasts its shard: together an all-gather of the parameters.
        self.sent("dp", ring_bytes(self.optimizer.param_bytes, self.dp_size, "allgather"))


# ---------------------------------------------------------------------------------------------
# 3. FSDP2 (ZeRO-3)
# ---------------------------------------------------------------------------------------------


class FSDPStrategy(DataParallelStrategy):
    """``fsdp``: torch FSDP2 ``fully_shard`` on every transformer block and on the root.

    Parameters, gradients and optimizer state are all sharded (dim 0, one piece per rank). A
    block's parameters are all-gathered just before its forward and backward and freed after;
    gradients are reduce-scattered (averaged) at the end of backward. Works on CPU with Gloo.

    * Clipping: each rank holds disjoint pieces of the gradients (``DTensor`` shards), so the
      local pieces are clipped with the norm combined over dp (``grads_sharded``).
    * Accumulation: ``set_requires_gradient_sync(False)`` on all but the last micro-batch.
    * ``replica_state_dict`` gathers the full parameters over dp
      (``torch.distributed.checkpoint.state_dict``); checkpoints hold each rank's local shards.
    * Memory: FSDP2 hands each block its gathered (unsharded) parameters right before the
      block's forward. A forward pre-hook, which runs after FSDP's, measures the parameter
      storage alive then (``peak_params_bytes``) and tells the activation meter that those
      storages are parameters, so the transient unsharded block is counted as parameters, not
      as activations. All-gathers FSDP prefetched but not yet handed over are not seen here (on
      a GPU the allocator's ``peak_bytes`` includes them).
    * ``comm_bytes`` is computed from the sharding plan (FSDP's collectives are internal): per
      micro-batch an all-gather of every parameter for forward and of the blocks' for backward
      (the root keeps its parameters until backward), plus one reduce-scatter of the gradients,
      each counted as a ring sends it (``ring_bytes``).
    """

    name = "fsdp"

    grads_sharded = True

    def setup(self) -> None:
        """Shard each block, then the root (which takes the embedding and the head)."""
        from torch.distributed.fsdp import fully_shard

        # Shards are cut from each rank's copy: make the replicas agree first.
        broadcast_module(self.module, self.dp_group)
        self.dp_mesh = self.mesh.dim_mesh("dp")
        blocks = [
            b for b in getattr(self.module, "blocks", []) if any(True for _ in b.parameters())
        ]
        for block in blocks:
            fully_shard(block, mesh=self.dp_mesh)
        fully_shard(self.module, mesh=self.dp_mesh)
        self.model = self.module
        self._sharded_bytes = storage_bytes(self.module.parameters())
        self.peak_params_bytes = self._sharded_bytes
        # Registered after fully_shard, so they run after FSDP's own pre-forward (the unshard).
        self._hooks = [
            m.register_forward_pre_hook(self._note_gathered) for m in [*blocks, self.module]
        ]

        def nbytes(params: Iterable[nn.Parameter]) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        all_params = list(self.module.parameters())
        block_params = [p for b in blocks for p in b.parameters()]
        self._gather_bytes = nbytes(all_params) + nbytes(block_params)
        self._scatter_bytes = nbytes(p for p in all_params if p.requires_grad)

    def _note_gathered(self, module: nn.Module, args: Any) -> None:
        """Parameters FSDP has just gathered: count them as parameters, now and at the peak."""
        from torch.distributed.tensor import DTensor

        gathered = [p for p in self.module.parameters() if not isinstance(p, DTensor)]
        self.activation_meter.skip(storage_ids(gathered))
        now = self._sharded_bytes + storage_bytes(gathered)
        self.peak_params_bytes = max(self.peak_params_bytes, now)

    def params_memory(self) -> dict[str, int]:
        """The local shards now; at the peak, the shards plus the gathered blocks."""
        return {
            "params_bytes": storage_bytes(self.module.parameters()),
            "peak_params_bytes": self.peak_params_bytes,
        }

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """As every strategy, then free the root's gathered parameters: a forward without
        backward leaves them unsharded (FSDP2 reshards the root after backward)."""
        try:
            return super().evaluate(batches)
        finally:
            self.module.reshard()

    def close(self) -> None:
        """Remove the memory hooks."""
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        super().close()

    @contextmanager
    def _without_grad_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def no_sync(self) -> AbstractContextManager[Any]:
        """Accumulate unsharded gradients locally; no reduce-scatter."""
        return self._without_grad_sync()

    def finish_grad_sync(self, step: int) -> None:
        """FSDP reduce-scattered during backward; count the bytes of the plan."""
        n = self.dp_size
        gather = ring_bytes(self._gather_bytes, n, "allgather")
        self.sent(
            "dp",
            self.cfg.grad_accum_steps * gather
            + ring_bytes(self._scatter_bytes, n, "reduce_scatter"),
        )

    def clip_pieces(self) -> list[tuple[torch.Tensor, bool]]:
        """This rank's shards as plain tensors whose ``.grad`` is its gradient shard.

        They share storage with the DTensors, so clipping them in place clips the real
        gradients; the norm combines them over dp (and over pp and tp, as for any mesh).
        """
        pieces = []
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            piece = p.detach().to_local()
            piece.grad = None if p.grad is None else p.grad.to_local()
            pieces.append((piece, name not in self.tp_shard_dims))
        return pieces

    def layer_grad_norms(self) -> dict[str, float]:
        """Each parameter's gradient norm: squares of the local shards, summed over dp."""
        named = [
            (n, p.grad.to_local()) for n, p in self.module.named_parameters() if p.grad is not None
        ]
        if not named:
            return {}
        squares = torch.stack([g.float().pow(2).sum() for _, g in named])
        dist.all_reduce(squares, group=self.dp_group)
        return dict(zip([n for n, _ in named], squares.sqrt().cpu().tolist(), strict=True))

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shards, as plain tensors (keyed like the model's state dict)."""
        return {
            k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
            for k, v in self.module.state_dict().items()
        }

    @torch.no_grad()
    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved shards back into this rank's pieces."""
        for k, v in self.module.state_dict().items():
            (v.to_local() if hasattr(v, "to_local") else v).copy_(state[k])

    def replica_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All-gather this stage's (or slice's) parameters over dp, on CPU, with GPT's names."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True)
        state = get_model_state_dict(self.module, options=options)
        return {k: v.detach().cpu().clone() for k, v in state.items()}
