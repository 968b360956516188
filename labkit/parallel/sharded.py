"""ZeRO-2 and ZeRO-3 by hand: flat parameters split into one shard per data-parallel rank.

ZeRO-1 (``labkit.parallel.zero``) shards only the optimizer state. The next two stages shard
more (Rajbhandari et al. 2020), and both are built here from one piece, ``FlatParam``: a few
parameters copied into one flat buffer, padded so the dp ranks split it evenly, each parameter
becoming a *view* of it. Rank ``r`` owns elements ``r*S .. (r+1)*S`` (its shard).

* **ZeRO-2** (``Zero2Strategy``): every rank keeps all parameters, but gradients are
  *reduce-scattered*: as soon as backward has produced every gradient of a flat buffer, one
  ``reduce_scatter_tensor`` sums the buffer over the ranks and leaves each rank only its shard;
  the full gradient buffer is freed. Each rank updates its shard (the optimizer only sees
  shards, so its state is sharded too) and an ``all_gather_into_tensor`` refreshes every rank's
  parameters. Bytes on the wire: reduce-scatter + all-gather = one all-reduce, as in DP.
* **ZeRO-3** (``Zero3Strategy``): the parameters are sharded too. Each module's parameters are
  gathered just before it runs (forward *and* backward) and freed right after, so a rank holds
  its shards plus one module's full parameters at a time. This is DeepSpeed's granularity (one
  module at a time); torch's FSDP2 (``fsdp``) gathers a whole transformer block at once.

Freeing is real: the full buffer's storage is resized to zero bytes and re-allocated on the next
gather, so the views autograd saved stay valid (torch's FSDP1 does the same). Frozen
parameters are left alone (full on every rank: they have no gradient or optimizer state).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.memory import storage_ids
from labkit.parallel.base import ring_bytes
from labkit.parallel.data_parallel import MB, DataParallelStrategy, broadcast_module

__all__ = ["FlatParam", "Zero2Strategy", "Zero3Strategy"]


class FlatParam:
    """Parameters of one kind as one padded flat buffer; this rank's shard of it.

    ``keep_full=True`` (ZeRO-2): the full buffer stays; the shard is a view of it.
    ``keep_full=False`` (ZeRO-3): the shard is its own storage; the full buffer exists only
    between ``gather()`` and ``free()``. ``replicated`` is True for tensor-parallel replicated
    parameters (they enter the clipping norm once, see ``Strategy.clip_pieces``).
    """

    def __init__(
        self, params: list[nn.Parameter], group: Any, *, keep_full: bool, replicated: bool
    ) -> None:
        self.params, self.group, self.replicated = params, group, replicated
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        numel = sum(p.numel() for p in params)
        self.shard_numel = -(-numel // self.world)  # ceil: the last shard is padded
        like = params[0]
        self.full = torch.zeros(self.shard_numel * self.world, dtype=like.dtype, device=like.device)
        self.offsets = []
        offset = 0
        with torch.no_grad():
            for p in params:
                view = self.full[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                self.offsets.append(offset)
                offset += p.numel()
        mine = self.full[self.rank * self.shard_numel : (self.rank + 1) * self.shard_numel]
        self.shard = nn.Parameter(mine if keep_full else mine.clone())
        self.full_nbytes = self.full.untyped_storage().nbytes()
        self.grad_buffer: torch.Tensor | None = None
        self.grad_views: list[torch.Tensor] = []  # one per parameter, into grad_buffer
        self.pending = len(params)  # gradients still to arrive in this backward
        self.launched = False  # its reduce-scatter of this step has started
        self.work: Any = None  # the in-flight reduce-scatter
        self.grad_out: torch.Tensor | None = None
        self.started = 0.0
        if not keep_full:
            self.free()

    # ------------------------------------------------------------------ parameters
    @property
    def gathered(self) -> bool:
        """Whether the full parameters are in memory."""
        return self.full.untyped_storage().nbytes() > 0

    def gather(self) -> None:
        """All-gather the shards into the full buffer (re-allocating it)."""
        if not self.gathered:
            self.full.untyped_storage().resize_(self.full_nbytes)
        dist.all_gather_into_tensor(self.full, self.shard.detach(), group=self.group)

    def free(self) -> None:
        """Release the full buffer's memory (the views keep their shapes, not their data)."""
        self.full.untyped_storage().resize_(0)

    def refresh(self) -> None:
        """ZeRO-2 after the optimizer step: every rank's full parameters from the new shards."""
        # The shard is a view into the output: gather from a copy (NCCL allows in-place, Gloo
        # does not promise it).
        dist.all_gather_into_tensor(self.full, self.shard.detach().clone(), group=self.group)

    # ------------------------------------------------------------------ gradients
    def accumulate(self, index: int) -> None:
        """Move parameter ``index``'s fresh gradient into the flat gradient buffer."""
        p = self.params[index]
        if self.grad_buffer is None:
            self._new_grad_buffer()
        view = self.grad_views[index]
        if p.grad is not view:
            # A fresh gradient, or autograd replaced ours by an out-of-place sum: either way
            # p.grad holds the full accumulated value. From now on it accumulates in the view.
            view.copy_(p.grad)
            p.grad = view

    def _new_grad_buffer(self) -> None:
        self.grad_buffer = self.shard.detach().new_zeros(self.shard_numel * self.world)
        self.grad_views = [
            self.grad_buffer[offset : offset + p.numel()].view_as(p)
            for p, offset in zip(self.params, self.offsets, strict=True)
        ]

    def reduce_scatter(self) -> None:
        """Start summing the gradient buffer over dp, each rank receiving its shard."""
        if self.grad_buffer is None:  # no gradient reached these parameters: contribute zeros
            self._new_grad_buffer()
        self.launched = True
        self.grad_out = self.grad_buffer.new_empty(self.shard_numel)
        self.started = time.perf_counter()
        self.work = dist.reduce_scatter_tensor(
            self.grad_out, self.grad_buffer, group=self.group, async_op=True
        )

    def finish(self) -> None:
        """Wait for the reduce-scatter; the shard's ``.grad`` becomes the averaged shard."""
        self.work.wait()
        self.work = None
        out = self.grad_out.div_(self.world)
        self.shard.grad = out if self.shard.grad is None else self.shard.grad.add_(out)
        self.grad_out = None
        for p in self.params:  # the full gradient is not kept: that is the point
            p.grad = None
        self.grad_buffer, self.grad_views = None, []
        self.pending = len(self.params)


def _flats_of(
    params: list[tuple[str, nn.Parameter]],
    group: Any,
    tp_split: dict[str, int],
    *,
    keep_full: bool,
    cap_bytes: int | None = None,
) -> list[FlatParam]:
    """FlatParams over ``params`` in order: a new one when the kind changes or it would overflow.

    A flat buffer holds one dtype and device, and either tp-replicated or tp-split parameters.
    """
    flats: list[FlatParam] = []
    current: list[nn.Parameter] = []
    key: Any = None
    size = 0

    def close() -> None:
        if current:
            flats.append(FlatParam(list(current), group, keep_full=keep_full, replicated=key[2]))
            current.clear()

    for name, p in params:
        kind = (p.dtype, p.device, name not in tp_split)
        nbytes = p.numel() * p.element_size()
        if current and (kind != key or (cap_bytes is not None and size + nbytes > cap_bytes)):
            close()
            size = 0
        key = kind
        current.append(p)
        size += nbytes
    close()
    return flats


class _ShardedDP(DataParallelStrategy):
    """What ZeRO-2 and ZeRO-3 share: flat parameters, gradient hooks, reduce-scatter, shards."""

    grads_sharded = True
    keep_full = True

    def make_flats(self) -> list[FlatParam]:
        """The flat buffers of this flavour (subclasses)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Make the replicas agree, flatten, and hook every trainable parameter."""
        broadcast_module(self.module, self.dp_group)
        self.sync_enabled = True
        self._handles: list[Any] = []
        self.flats = self.make_flats()
        self.frozen_bytes = sum(
            p.numel() * p.element_size() for p in self.module.parameters() if not p.requires_grad
        )
        self._handles += [
            p.register_post_accumulate_grad_hook(self._grad_hook(flat, i))
            for flat in self.flats
            for i, p in enumerate(flat.params)
        ]
        self._spans: list[tuple[str, float, float]] = []
        self._in_flight: list[FlatParam] = []  # reduce-scatters started, oldest first
        self.peak_params_bytes = self.params_bytes()

    def _grad_hook(self, flat: FlatParam, index: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            flat.accumulate(index)
            flat.pending -= 1
            if flat.pending == 0:
                self.on_backward_done(flat)

        return hook

    def on_backward_done(self, flat: FlatParam) -> None:
        """Every gradient of ``flat`` is in: start its reduce-scatter (unless accumulating)."""
        if self.sync_enabled:
            flat.reduce_scatter()
            self._in_flight.append(flat)
            # Bound what is in flight (the oldest finish first), so that the full gradient
            # buffers really are freed during backward and never all exist at once.
            while len(self._in_flight) > 2:
                self._finish(self._in_flight.pop(0))
        else:
            flat.pending = len(flat.params)

    def _finish(self, flat: FlatParam) -> None:
        flat.finish()
        self._spans.append(("reduce_scatter", flat.started, time.perf_counter()))
        self.sent("dp", ring_bytes(flat.full_nbytes, flat.world, "reduce_scatter"))

    def params_bytes(self) -> int:
        """Bytes of parameter storage alive on this rank right now (measured, not computed)."""
        total = self.frozen_bytes
        for flat in self.flats:
            total += flat.full.untyped_storage().nbytes()
            if not self.keep_full:
                total += flat.shard.untyped_storage().nbytes()
        return total

    @contextmanager
    def _without_sync(self) -> Iterator[None]:
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def no_sync(self) -> AbstractContextManager[Any]:
        """Accumulate full gradients locally; reduce-scatter once, after the last backward."""
        return self._without_sync()

    def finish_grad_sync(self, step: int) -> None:
        """Reduce-scatter what backward did not reach, wait for all; record the spans."""
        for flat in self.flats:
            if not flat.launched:  # backward did not reach all of it: send what is there
                flat.reduce_scatter()
                self._in_flight.append(flat)
        for flat in self._in_flight:
            self._finish(flat)
        self._in_flight.clear()
        for flat in self.flats:
            flat.launched = False
        t0 = self.timeline.t0
        for phase, start, end in self._spans:
            self.timeline.add(phase, step, -1, start - t0, end - t0)
        self._spans.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The shards: the optimizer (and so its state) sees this rank's piece only."""
        return [flat.shard for flat in self.flats]

    def clip_pieces(self) -> list[tuple[torch.Tensor, bool]]:
        """The gradient shards; the norm combines them over dp (and pp, tp)."""
        return [(flat.shard, flat.replicated) for flat in self.flats]

    def layer_grad_norms(self) -> dict[str, float]:
        """Each parameter's gradient norm, from the shards: every rank sums the squares of the
        part of each parameter its shard covers, one all-reduce over dp adds them up."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        keys, pieces = [], []
        for flat in self.flats:
            grad = flat.shard.grad
            lo = flat.rank * flat.shard_numel
            for p, offset in zip(flat.params, flat.offsets, strict=True):
                keys.append(names[id(p)])
                a, b = max(offset, lo), min(offset + p.numel(), lo + flat.shard_numel)
                if grad is None or a >= b:
                    pieces.append(torch.zeros((), dtype=torch.float32, device=flat.full.device))
                else:
                    pieces.append(grad[a - lo : b - lo].float().pow(2).sum())
        if not pieces:
            return {}
        squares = torch.stack(pieces)
        dist.all_reduce(squares, group=self.dp_group)
        return dict(zip(keys, squares.sqrt().cpu().tolist(), strict=True))

    def param_storage_ids(self) -> set[int]:
        """Flat buffers and shards: every view of them is a parameter, not an activation."""
        return storage_ids([f.full for f in self.flats] + [f.shard for f in self.flats]) | (
            super().param_storage_ids()
        )

    def params_memory(self) -> dict[str, int]:
        """Parameter bytes now and at the peak, as the storages measured them."""
        return {"params_bytes": self.params_bytes(), "peak_params_bytes": self.peak_params_bytes}

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().close()


class Zero2Strategy(_ShardedDP):
    """``zero2``: gradients reduce-scattered in buckets of ``bucket_mb``, optimizer on shards.

    The buckets follow the reverse order of the parameters (the order backward produces their
    gradients), so a bucket's reduce-scatter starts while backward computes earlier layers.
    After the optimizer step (a hook on it) every flat buffer is all-gathered again.
    """

    def make_flats(self) -> list[FlatParam]:
        """Buckets of at most ``bucket_mb``, last layers first."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        cap = int(self.cfg.bucket_mb * MB)
        return _flats_of(
            named[::-1], self.dp_group, self.tp_shard_dims, keep_full=True, cap_bytes=cap
        )

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the shards; after each step, refresh the parameters."""
        optimizer = super().make_optimizer()
        optimizer.register_step_post_hook(lambda *_: self._refresh())
        return optimizer

    @torch.no_grad()
    def _refresh(self) -> None:
        start = time.perf_counter()
        for flat in self.flats:
            flat.refresh()
            self.sent("dp", ring_bytes(flat.full_nbytes, flat.world, "allgather"))
        t0 = self.timeline.t0
        self.timeline.add("allgather", self._step, -1, start - t0, time.perf_counter() - t0)


class Zero3Strategy(_ShardedDP):
    """``zero3``: parameters sharded; each module's gathered for its forward and backward.

    A forward pre-hook gathers the module's flat buffers, a forward hook frees them and, when
    autograd will come back, hooks the output's gradient to gather them again just before the
    module's backward; the gradient hooks free them once the module's gradients are in. The
    all-gathers block inside forward and backward (``allgather`` spans nested in them).
    """

    keep_full = False
    gathers_in_forward = True

    def make_flats(self) -> list[FlatParam]:
        """One unit per module that owns trainable parameters (a Linear, a LayerNorm...)."""
        self.units: dict[nn.Module, list[FlatParam]] = {}
        flats = []
        for prefix, module in self.module.named_modules():
            own = [
                (f"{prefix}.{n}" if prefix else n, p)
                for n, p in module.named_parameters(recurse=False)
            ]
            own = [(n, p) for n, p in own if p.requires_grad]
            if not own:
                continue
            unit = _flats_of(own, self.dp_group, self.tp_shard_dims, keep_full=False)
            self.units[module] = unit
            flats += unit
            self._handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._handles.append(module.register_forward_hook(self._post_forward))
        return flats

    def _gather(self, unit: list[FlatParam]) -> None:
        start = time.perf_counter()
        for flat in unit:
            if not flat.gathered:
                flat.gather()
                self.sent("dp", ring_bytes(flat.full_nbytes, flat.world, "allgather"))
        self.peak_params_bytes = max(self.peak_params_bytes, self.params_bytes())
        if self._recording:
            t0 = self.timeline.t0
            self.timeline.add("allgather", self._step, -1, start - t0, time.perf_counter() - t0)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self._gather(self.units[module])

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        unit = self.units[module]
        if torch._C._current_graph_task_id() != -1:
            # A forward run inside backward (activation recomputation): the module's backward
            # comes next and needs the parameters; its gradient hooks free them.
            return output
        for flat in unit:
            flat.free()
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:

            def before_backward(grad: torch.Tensor) -> torch.Tensor:
                self._gather(unit)
                return grad

            output.register_hook(before_backward)
        return output

    def on_backward_done(self, flat: FlatParam) -> None:
        """The module's backward used the full parameters for the last time: free them."""
        flat.free()
        super().on_backward_done(flat)

    # ------------------------------------------------------------------ state
    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shards (the module's own tensors are freed between uses)."""
        state = {f"shard.{i}": flat.shard.detach().clone() for i, flat in enumerate(self.flats)}
        frozen = {
            n: p.detach().clone() for n, p in self.module.named_parameters() if not p.requires_grad
        }
        buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        return {**state, **frozen, **buffers}

    @torch.no_grad()
    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved shards (and frozen parameters) back."""
        for i, flat in enumerate(self.flats):
            flat.shard.copy_(state[f"shard.{i}"])
        for n, p in self.module.named_parameters():
            if not p.requires_grad:
                p.copy_(state[n])
        for n, b in self.module.named_buffers():
            b.copy_(state[n])

    @torch.no_grad()
    def replica_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gather every unit over dp, copy the full parameters to CPU, free them again."""
        for flat in self.flats:
            flat.gather()
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        for flat in self.flats:
            flat.free()
        return state
