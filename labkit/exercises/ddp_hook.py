"""Exercise: DDP's bucketed gradient hook, overlapping communication with backward.

The gradients are packed into flat buckets (``Bucket``: a ``buffer``, one ``view`` of it per
parameter, a ``pending`` count, the in-flight ``work``), in reverse layer order: roughly the
order backward produces them. A hook on each parameter runs as soon as autograd has accumulated
its gradient; when a bucket's last gradient arrives, that bucket's all-reduce starts
*asynchronously* while backward goes on with the earlier layers. The learner writes two
functions, in a cell::

    def my_make_hook(bucket, view, group=None):
        def hook(param):
            ...  # copy param.grad into view, make param.grad the view, count the bucket down;
                 # when it is complete: bucket.work = dist.all_reduce(bucket.buffer, group=group,
                 #                                                    async_op=True)
        return hook

    def my_finish_grad_sync(buckets, world_size):
        ...  # wait for every bucket's work, divide its buffer by world_size, and get the
             # bucket ready for the next backward (pending back to len(bucket.params))

and runs ``print(check_bucket_hook(my_make_hook, my_finish_grad_sync))``. The checker trains a
small MLP for two steps on 2 Gloo processes (three buckets of two parameters), watches every
all-reduce (when it starts, how many of its bucket's gradients were ready, blocking or not) and
compares each gradient with the single-process gradient of the whole batch.
Reference: ``labkit.parallel.data_parallel.BucketedDP``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist  # noqa: F401 (in the namespace of the learner's code)
from torch import Tensor, nn

from labkit.exercises import _harness

__all__ = ["Bucket", "check_bucket_hook", "my_finish_grad_sync", "my_make_hook"]


@dataclass
class Bucket:
    """Some parameters' gradients in one flat ``buffer``; ``views[i]`` is ``params[i]``'s slice."""

    params: list[nn.Parameter]
    buffer: Tensor
    views: list[Tensor]
    pending: int
    work: Any = None


def my_make_hook(bucket: Bucket, view: Tensor, group: Any = None) -> Any:
    """The placeholder: return ``hook(param)``, run when ``param``'s gradient is ready."""
    raise NotImplementedError(
        "return a hook that moves param.grad into view, counts bucket.pending down, and starts "
        "dist.all_reduce(bucket.buffer, async_op=True) when the bucket is complete"
    )


def my_finish_grad_sync(buckets: list[Bucket], world_size: int) -> None:
    """The placeholder: wait for every bucket, average it, reset it for the next backward."""
    raise NotImplementedError("wait on bucket.work, divide bucket.buffer, reset bucket.pending")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _buckets(model: nn.Module) -> list[Bucket]:
    """Two parameters per bucket, last layer first (the order backward produces them)."""
    params = list(reversed(list(model.parameters())))
    out = []
    for i in range(0, len(params), 2):
        group = params[i : i + 2]
        buffer = torch.zeros(sum(p.numel() for p in group))
        views, offset = [], 0
        for p in group:
            views.append(buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        out.append(Bucket(group, buffer, views, len(group)))
    return out


def _grads(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, world_size: int, hook_fn: Any, finish_fn: Any) -> str | None:
    make_hook = _harness.load(hook_fn, dict(globals()))
    finish = _harness.load(finish_fn, dict(globals()))
    model, single = _model(), _model()
    buckets = _buckets(model)
    params = list(model.parameters())
    ready: set[int] = set()
    for p in params:  # registered first: runs before the learner's hook on the same parameter
        p.register_post_accumulate_grad_hook(lambda p: ready.add(id(p)))
    for bucket in buckets:
        for p, view in zip(bucket.params, bucket.views, strict=True):
            hook = _harness.call(make_hook, "make_hook raised", bucket, view, None)
            if not callable(hook):
                raise _harness.LearnerError(
                    f"make_hook must return the hook function, not {hook!r}"
                )
            p.register_post_accumulate_grad_hook(hook)
    state = {"in_backward": False, "step": 0, "launches": [], "problem": None}

    def on_all_reduce(name: str, original: Any, tensor: Tensor, *args: Any, **kw: Any) -> Any:
        index = next((i for i, b in enumerate(buckets) if b.buffer is tensor), None)
        work = original(tensor, *args, **kw)
        state["launches"].append((index, work))
        where = f"in step {state['step']}, bucket {index}"
        if state["problem"] is None:
            if index is None:
                state["problem"] = (
                    f"Not yet: in step {state['step']} you all-reduced a tensor of "
                    f"{tensor.numel()} elements that is not a bucket's buffer: one all-reduce per "
                    "bucket, on bucket.buffer (the views share its memory)."
                )
            elif not state["in_backward"]:
                state["problem"] = (
                    f"Not yet: {where}'s all-reduce started after backward had finished: nothing "
                    "overlaps. Start it in the hook, as soon as the bucket's last gradient arrives."
                )
            elif sum(id(p) in ready for p in buckets[index].params) < len(buckets[index].params):
                got = sum(id(p) in ready for p in buckets[index].params)
                state["problem"] = (
                    f"Not yet: {where} fired before all its gradients were ready ({got} of "
                    f"{len(buckets[index].params)} had arrived): start it when pending reaches 0."
                )
            elif not kw.get("async_op", args[2] if len(args) > 2 else False):
                state["problem"] = (
                    f"Not yet: {where}'s all-reduce blocks backward until it is done: pass "
                    "async_op=True, keep the work in bucket.work and wait in finish_grad_sync."
                )
        return work

    gen = torch.Generator().manual_seed(1)
    for step in (1, 2):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        want = _grads(single, x, y)
        rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
        state.update(step=step, launches=[])
        ready.clear()
        for p in params:
            p.grad = None  # as optimizer.zero_grad() leaves them
        with _harness.watching(("all_reduce",), on_all_reduce):
            state["in_backward"] = True
            loss = nn.functional.mse_loss(model(x[rows]), y[rows])
            _harness.call(loss.backward, f"in step {step} your hook raised")
            state["in_backward"] = False
            try:
                _harness.call(
                    finish, f"in step {step} finish_grad_sync raised", buckets, world_size
                )
            except _harness.LearnerError:
                if not state["problem"]:
                    raise
        message = state["problem"] or _verdict(
            step, state["launches"], buckets, model, want, world_size
        )
        if _harness.any_rank(message is not None):  # stop together: no rank left waiting
            return message
    return None


def _verdict(
    step: int,
    launches: list[Any],
    buckets: list[Bucket],
    model: nn.Module,
    want: list[Tensor],
    world_size: int,
) -> str | None:
    """What is wrong after this step's ``finish_grad_sync`` (None: nothing)."""
    fired = [i for i, _ in launches]
    for i in range(len(buckets)):
        if fired.count(i) != 1:
            reset = " (reset bucket.pending in finish_grad_sync)" if step == 2 else ""
            return (
                f"Not yet: in step {step} bucket {i} fired {fired.count(i)} times, not once{reset}."
            )
    if any(work is not None and not work.is_completed() for _, work in launches):
        return "Not yet: finish_grad_sync returned before every all-reduce was done: wait()."
    for (name, p), g in zip(model.named_parameters(), want, strict=True):
        if p.grad is None:
            return f"Not yet: in step {step} {name} has no gradient after finish_grad_sync."
        if torch.allclose(p.grad, g, atol=1e-6):
            continue
        diff = float((p.grad - g).abs().max())
        head = f"Not yet: in step {step} {name}'s gradient differs from the single-process gradient by {diff:.3g}"
        if torch.allclose(p.grad, g * world_size, atol=1e-6):
            return f"{head}: it is the sum over ranks; divide by world_size."
        if not any(p.grad.data_ptr() == v.data_ptr() for b in buckets for v in b.views):
            return (
                f"{head}: param.grad is not its view of the bucket, so it never saw the all-reduce."
            )
        if not p.grad.abs().sum():
            return f"{head}: it is zero: copy param.grad into the view before the all-reduce."
        return f"{head}."
    return None


def check_bucket_hook(make_hook: Any, finish_grad_sync: Any, timeout_s: float = 60.0) -> str:
    """Check a learner's ``make_hook`` and ``finish_grad_sync`` on 2 Gloo processes (never raises)."""
    return _harness.verdict(
        _worker,
        (make_hook, finish_grad_sync),
        "Correct! Each bucket's all-reduce started, asynchronously, during backward, the moment "
        "its last gradient arrived; after finish_grad_sync every gradient is the single-process "
        "gradient of the whole batch, two steps in a row.",
        timeout_s,
    )
