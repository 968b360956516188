"""Data parallelism: every rank holds the whole model, takes a slice of the batch, and the ranks
average their gradients before the optimizer step, so every replica takes the same step.

Three ways to average, from the simplest to torch's own:

1. ``NaiveDP``: after backward, one blocking all-reduce per parameter. Correct, but the network
   sits idle during the whole backward pass and every small tensor pays the latency of a message.
2. ``BucketedDP``: what torch's DDP does. Gradients are packed into flat buckets of about
   ``bucket_mb`` megabytes, in the *reverse* order of the parameters' registration (roughly the
   order backward produces them: last layer first). A hook on every parameter notices when its
   gradient is ready; as soon as a bucket is full its all-reduce starts, asynchronously, while
   backward goes on computing the earlier layers' gradients. Communication overlaps compute.
3. ``DDPStrategy``: ``torch.nn.parallel.DistributedDataParallel``, the reference.

``NaiveDP`` and ``BucketedDP`` are building blocks for any ``nn.Module`` inside a process group
you set up yourself, used the way DDP is::

    model = BucketedDP(MyNet())          # broadcasts rank 0's weights to every rank
    loss_fn(model(x), y).backward()      # buckets are all-reduced during backward
    model.finish_grad_sync()             # wait; every .grad is now the average over ranks
    optimizer.step()

The ``dp-naive``, ``dp-bucketed`` and ``ddp`` strategies of ``labkit.run`` wrap them for the
training loop. Averages are SUM then divide: Gloo's ``ReduceOp.AVG`` support is recent and uneven.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.parallel.base import Strategy, ring_bytes

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "BucketedDP",
    "BucketedDPStrategy",
    "DDPStrategy",
    "DataParallelStrategy",
    "NaiveDP",
    "NaiveDPStrategy",
    "broadcast_module",
]

MB = 1 << 20  # megabytes as torch's DDP counts them (MiB)


@torch.no_grad()
def broadcast_module(module: nn.Module, group: ProcessGroup | None = None) -> None:
    """Copy rank 0's parameters and buffers (of ``group``) into every rank's ``module``.

    Replicas must start identical: data parallelism only keeps them identical, by applying the
    same averaged update everywhere. ``parameters()`` lists a tied weight once, so it is sent once.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), group=group, group_src=0)


class _DataParallel(nn.Module):
    """What both wrappers share: the wrapped module, its trainable parameters, ``no_sync``."""

    def __init__(self, module: nn.Module, group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)
        # parameters() yields a tied (shared) parameter once: it is synchronised once. Frozen
        # parameters get no gradient, so there is nothing to average.
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.sync_enabled = True
        broadcast_module(module, group)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module."""
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate local gradients without communicating.

        Use it for all micro-batches but the last; the last backward (outside) and
        ``finish_grad_sync`` then average the accumulated sums.
        """
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    @property
    def grad_bytes(self) -> int:
        """Bytes of gradients one synchronisation all-reduces."""
        return sum(p.numel() * p.element_size() for p in self.params)

    def finish_grad_sync(self) -> None:
        """After backward: make every gradient the average over the ranks (subclasses)."""
        raise NotImplementedError


class NaiveDP(_DataParallel):
    """Data parallelism the simple way: after backward, all-reduce each gradient, one by one.

    ``NaiveDP(module, group=None)`` broadcasts rank 0's parameters and buffers on construction.
    After ``loss.backward()`` call ``finish_grad_sync()``; every gradient then holds the average
    over the ranks of ``group``. Inside ``no_sync()``, ``finish_grad_sync`` does nothing.
    """

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """All-reduce (SUM) every gradient, blocking, then divide by the number of ranks."""
        if not self.sync_enabled:
            return
        for p in self.params:
            if p.grad is None:  # unused on this rank; another rank may have a gradient for it
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
            p.grad.div_(self.world_size)


class _Bucket:
    """A flat buffer holding the gradients of a few parameters, reduced with one all-reduce."""

    __slots__ = ("buffer", "params", "pending", "started", "views", "work")

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.buffer = torch.zeros(
            sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
        )
        # One view of the buffer per parameter, shaped like it. The gradients *become* these
        # views (``p.grad = view``), so the averaged result needs no copy back.
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.pending = len(params)  # gradients still to arrive in this backward
        self.work: Any = None  # the in-flight all-reduce (a Work, or a Future when timed)
        self.started = 0.0


class BucketedDP(_DataParallel):
    """Data parallelism with gradient buckets and communication overlapped with backward.

    ``BucketedDP(module, bucket_mb=25.0, group=None)``: parameters are grouped, in reverse
    registration order, into flat buckets of at most ``bucket_mb`` MiB (a parameter larger than
    that gets a bucket of its own). A ``register_post_accumulate_grad_hook`` on each parameter
    copies its gradient into the bucket and makes ``p.grad`` a view of it; when a bucket's last
    gradient arrives, its all-reduce starts with ``async_op=True`` while backward continues.
    ``finish_grad_sync()`` waits for them all and divides by the number of ranks.

    Buckets are launched strictly in order, on every rank, so all ranks issue their collectives
    in the same sequence even if gradients arrive in a different order.
    """

    def __init__(
        self, module: nn.Module, bucket_mb: float = 25.0, group: ProcessGroup | None = None
    ) -> None:
        super().__init__(module, group)
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} is invalid: must be > 0")
        self.bucket_mb = bucket_mb
        self.buckets = self._make_buckets(int(bucket_mb * MB))
        self.next_bucket = 0  # the next bucket to launch: buckets go out in order
        self.record_times = False  # set True to collect (bucket, start, end) per all-reduce
        self.bucket_times: list[tuple[int, float, float]] = []
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(bucket, view))
            for bucket in self.buckets
            for p, view in zip(bucket.params, bucket.views, strict=True)
        ]

    def _make_buckets(self, cap_bytes: int) -> list[_Bucket]:
        """Greedy bucketing in reverse registration order, as torch's DDP does.

        A bucket closes when the next parameter would overflow it, or has another dtype or
        device (one flat buffer holds one kind of tensor).
        """
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            same_kind = groups and (groups[-1][0].dtype, groups[-1][0].device) == (
                p.dtype,
                p.device,
            )
            if groups and same_kind and size + nbytes <= cap_bytes:
                groups[-1].append(p)
                size += nbytes
            else:
                groups.append([p])
                size = nbytes
        return [_Bucket(params) for params in groups]

    def _make_hook(self, bucket: _Bucket, view: torch.Tensor) -> Any:
        """The per-parameter hook: runs right after autograd accumulated this parameter's grad.

        Kept to a few cheap operations: it runs for every parameter on every step.
        """

        def hook(param: torch.Tensor) -> None:
            if not self.sync_enabled:
                return  # accumulating under no_sync: leave the gradient where it is
            grad = param.grad
            if grad is not view:
                # A fresh gradient (the optimizer set grads to None): move it into the bucket.
                # From now on autograd accumulates straight into the view.
                view.copy_(grad)
                param.grad = view
            if bucket.pending <= 0:
                raise RuntimeError(
                    "BucketedDP: a gradient became ready twice before finish_grad_sync(); run "
                    "one backward per synchronisation and put the others inside no_sync()"
                )
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready_buckets()

        return hook

    def _launch_ready_buckets(self) -> None:
        """Start the all-reduce of every complete bucket, in bucket order."""
        buckets = self.buckets
        while self.next_bucket < len(buckets) and buckets[self.next_bucket].pending == 0:
            bucket = buckets[self.next_bucket]
            work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            if self.record_times:
                bucket.started = time.perf_counter()
                bucket.work = work.get_future().then(self._timer(self.next_bucket))
            else:
                bucket.work = work
            self.next_bucket += 1

    def _timer(self, index: int) -> Any:
        """A Future callback recording when bucket ``index``'s all-reduce finished."""

        def done(fut: Any) -> Any:
            bucket = self.buckets[index]
            self.bucket_times.append((index, bucket.started, time.perf_counter()))
            return fut.value()

        return done

    @torch.no_grad()
    def _fill_unfinished(self) -> None:
        """Complete buckets whose hooks did not all fire (parameters unused in this backward).

        A parameter without a gradient contributes zeros; its averaged gradient is then the other
        ranks' contribution (zero if no rank used it), so every rank ends with the same values.
        """
        for bucket in self.buckets[self.next_bucket :]:
            if bucket.pending:
                for p, view in zip(bucket.params, bucket.views, strict=True):
                    if p.grad is None:
                        view.zero_()
                    elif p.grad is not view:
                        view.copy_(p.grad)
                    p.grad = view
                bucket.pending = 0
        self._launch_ready_buckets()

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's all-reduce, then divide: each ``.grad`` is the average."""
        if not self.sync_enabled:
            return
        if self.next_bucket < len(self.buckets):
            self._fill_unfinished()
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None
            bucket.buffer.div_(self.world_size)
            bucket.pending = len(bucket.params)
        self.next_bucket = 0

    def close(self) -> None:
        """Remove the gradient hooks (the module works on its own again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------
# Strategies for the training loop
# ---------------------------------------------------------------------------------------------


class DataParallelStrategy(Strategy):
    """What every data-parallel flavour shares: the dp group, and each replica its batch slice.

    ``dp_size`` replicas (``mesh.size("dp")``) each take a slice of every batch, so the loop
    scales each rank's loss by ``dp_size / n_tokens`` and the averaged gradient is exactly the
    gradient of the global batch's mean loss, however unevenly its rows split. Each replica may
    itself be a pipeline stage or a tensor-parallel slice: the wrappers only see a module.
    """

    @property
    def dp_group(self) -> Any:
        """The ranks that average gradients with this one: its replicas (same stage, same
        slice) and, with context parallelism, the cp ranks that hold the rest of each sequence."""
        return self.mesh.group("dp", "cp")


class NaiveDPStrategy(DataParallelStrategy):
    """``dp-naive``: ``NaiveDP``, one blocking all-reduce per parameter after backward."""

    name = "dp-naive"

    def setup(self) -> None:
        """Wrap the model (broadcasting rank 0's weights)."""
        self.model = self.dp = NaiveDP(self.module, group=self.dp_group)

    def no_sync(self) -> AbstractContextManager[Any]:
        """Accumulate without communicating."""
        return self.dp.no_sync()

    def finish_grad_sync(self, step: int) -> None:
        """All-reduce every gradient (one ``allreduce`` span)."""
        with self.timeline.span("allreduce", step):
            self.dp.finish_grad_sync()
        self.sent("dp", ring_bytes(self.dp.grad_bytes, self.sync_size, "allreduce"))


class BucketedDPStrategy(DataParallelStrategy):
    """``dp-bucketed``: ``BucketedDP`` with ``cfg.bucket_mb``; all-reduces overlap backward.

    The timeline gets one ``allreduce`` span per bucket, from its launch (during backward) to its
    completion, so the overlap with the ``backward`` spans is visible.
    """

    name = "dp-bucketed"

    def setup(self) -> None:
        """Wrap the model in buckets (broadcasting rank 0's weights)."""
        self.model = self.dp = BucketedDP(
            self.module, bucket_mb=self.cfg.bucket_mb, group=self.dp_group
        )
        self.dp.record_times = self.timeline.enabled

    def no_sync(self) -> AbstractContextManager[Any]:
        """Accumulate without communicating."""
        return self.dp.no_sync()

    def finish_grad_sync(self, step: int) -> None:
        """Wait for the buckets; record when each all-reduce ran."""
        self.dp.finish_grad_sync()
        t0 = self.timeline.t0
        for _, start, end in self.dp.bucket_times:
            self.timeline.add("allreduce", step, -1, start - t0, end - t0)
        self.dp.bucket_times.clear()
        self.sent("dp", ring_bytes(self.dp.grad_bytes, self.sync_size, "allreduce"))

    def close(self) -> None:
        """Remove the gradient hooks."""
        self.dp.close()
        super().close()


class DDPStrategy(DataParallelStrategy):
    """``ddp``: torch's ``DistributedDataParallel`` with ``bucket_cap_mb=cfg.bucket_mb``.

    With the timeline on and no profiler, a communication hook that does exactly what DDP's
    default does for this loop (SUM all-reduce of the bucket, then divide) times each bucket's
    all-reduce in Python. With ``profile=True`` (the profiler sees DDP's all-reduces itself) or
    ``timeline=False``, DDP runs untouched: its C++ default, which is what the benchmark measures.
    """

    name = "ddp"

    def setup(self) -> None:
        """Wrap the model in DDP (which broadcasts rank 0's weights and buffers)."""
        from torch.nn.parallel import DistributedDataParallel

        device = self.ctx.device
        kwargs: dict[str, Any] = {
            "bucket_cap_mb": self.cfg.bucket_mb,
            "process_group": self.dp_group,
        }
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index]  # on CPU DDP takes no device_ids
        self.model = self.ddp = DistributedDataParallel(self.module, **kwargs)
        self._spans: list[tuple[float, float]] = []
        if self.timeline.enabled and not self.cfg.profile:
            self.ddp.register_comm_hook(None, self._timed_allreduce)
        self._grad_bytes = sum(
            p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad
        )

    # No annotations on `bucket` and the return value: DDP checks them against the real classes,
    # and `from __future__ import annotations` turns them into strings that fail that check.
    def _timed_allreduce(self, state: Any, bucket):
        """DDP communication hook: SUM all-reduce the bucket (a dist.GradBucket), divide, time it."""
        start = time.perf_counter()
        buffer = bucket.buffer()
        fut = dist.all_reduce(buffer, group=self.dp_group, async_op=True).get_future()
        world = self.sync_size

        def done(f: torch.futures.Future) -> torch.Tensor:
            self._spans.append((start, time.perf_counter()))
            return f.value()[0].div_(world)

        return fut.then(done)

    def no_sync(self) -> AbstractContextManager[Any]:
        """DDP's own ``no_sync``."""
        return self.ddp.no_sync()

    def finish_grad_sync(self, step: int) -> None:
        """DDP already averaged during backward; record the spans its hook measured."""
        t0 = self.timeline.t0
        for start, end in self._spans:
            self.timeline.add("allreduce", step, -1, start - t0, end - t0)
        self._spans.clear()
        self.sent("dp", ring_bytes(self._grad_bytes, self.sync_size, "allreduce"))
