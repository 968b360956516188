"""Exercise: a ZeRO-1 optimizer step (SGD with momentum), checked on 2 Gloo processes.

Plain data parallelism keeps the whole optimizer state on every rank. ZeRO-1 (Rajbhandari et
al. 2020) shards it: rank ``r`` owns a slice of the parameters, keeps the momentum of that
slice only, updates that slice only, and then the ranks exchange their updated slices, so that
every rank again holds every parameter. The learner writes, in a cell::

    def my_zero1_step(params, grad, state, lr, momentum, group=None):
        # params: the model's parameters as one flat vector (the same on every rank), updated
        #         in place; grad: its gradient, already averaged over the ranks;
        # state: this rank's optimizer state, a dict kept between calls (empty at first)
        ...  # 1. my slice of params and grad: torch.tensor_split(..., n)[rank]
             # 2. the momentum of my slice: buf = momentum * buf + grad; slice -= lr * buf
             # 3. every rank gets every slice: dist.broadcast(slice_q, group_src=q) for each q

and runs ``print(check_zero1_step(my_zero1_step))``. The checker takes three steps on 11
parameters (an uneven split) on 2 ranks and compares each with single-process SGD with
momentum, the state's size with a shard's, and names what is off. Any split of the parameters
among the ranks is accepted. Reference: ``labkit.parallel.zero.ShardedOptimizer``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist  # noqa: F401 (in the namespace of the learner's code)
from torch import Tensor

from labkit.exercises import _harness

__all__ = ["check_zero1_step", "my_zero1_step"]

N_PARAMS, STEPS, LR, MOMENTUM = 11, 3, 0.1, 0.9


def my_zero1_step(
    params: Tensor, grad: Tensor, state: dict, lr: float, momentum: float, group: Any = None
) -> None:
    """The placeholder: update this rank's slice of ``params``, then share the slices."""
    raise NotImplementedError(
        "update only torch.tensor_split(params, n)[rank] with its momentum (kept in state), "
        "then broadcast each rank's slice from its owner"
    )


def _state_numel(value: Any) -> int:
    """Elements of every tensor in ``value`` (dicts, lists, tuples searched)."""
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, dict):
        return sum(_state_numel(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_state_numel(v) for v in value)
    return 0


def _sgd(params: Tensor, grads: list[Tensor], reset: bool = False) -> list[Tensor]:
    """Single-process SGD with momentum: the parameters after each step (``reset``: no memory)."""
    p, buf, out = params.clone(), torch.zeros_like(params), []
    for g in grads:
        buf = g.clone() if reset else MOMENTUM * buf + g
        p = p - LR * buf
        out.append(p.clone())
    return out


def _ranges(mask: Tensor) -> str:
    """Indices where ``mask`` holds, as ranges: "0:5, 8:11"."""
    idx, parts, start = mask.nonzero().flatten().tolist(), [], None
    for i, j in zip(idx, idx[1:] + [None], strict=True):
        start = i if start is None else start
        if j != i + 1:
            parts.append(f"{start}:{i + 1}")
            start = None
    return ", ".join(parts)


def _verdict(
    rank: int,
    n: int,
    k: int,
    params: Tensor,
    before: Tensor,
    want: Tensor,
    forgetful: Tensor,
    state: dict,
) -> str | None:
    """What is wrong with this rank's parameters and state after step ``k + 1`` (None: nothing)."""
    head = f"Not yet: after step {k + 1}, rank {rank}'s parameters"
    kept = _state_numel(state)
    if kept > math.ceil(N_PARAMS / n):
        return (
            f"Not yet: rank {rank} keeps {kept} numbers of optimizer state for {N_PARAMS} "
            f"parameters: that is plain data parallelism. ZeRO-1 keeps the momentum of this "
            f"rank's slice only, about {N_PARAMS}/{n}."
        )
    if torch.allclose(params, want):
        return None
    stale, done = torch.isclose(params, before), torch.isclose(params, want)
    if bool(stale.all()):
        return (
            f"{head} did not change: update the slice in place (a view of params, with "
            "sub_ or -=; `slice = slice - ...` only makes a new tensor)."
        )
    if bool((stale | done).all()):
        return (
            f"{head} {_ranges(stale)} were not updated while {_ranges(done)} were: each rank "
            "updates its own slice, then the slices must reach every rank (broadcast each "
            "from its owner, or all-gather)."
        )
    if k > 0 and torch.allclose(params, forgetful):
        return (
            f"{head} move as if the momentum started from zero again: keep it in `state` "
            "(it is the same dict at every call) instead of a fresh tensor each step."
        )
    diff = float((params - want).abs().max())
    return f"{head} differ from single-process SGD with momentum by {diff:.3g}."


def _worker(rank: int, n: int, shipped: _harness.Shipped) -> str | None:
    step_fn = _harness.load(shipped, dict(globals()))
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(N_PARAMS, generator=gen, dtype=torch.float64)
    grads = [torch.randn(N_PARAMS, generator=gen, dtype=torch.float64) for _ in range(STEPS)]
    want, forgetful = _sgd(start, grads), _sgd(start, grads, reset=True)
    params, state, before = start.clone(), {}, start.clone()
    for k, g in enumerate(grads):
        _harness.call(
            step_fn,
            f"in step {k + 1} your function raised",
            params,
            g.clone(),
            state,
            LR,
            MOMENTUM,
            None,
        )
        message = _verdict(rank, n, k, params, before, want[k], forgetful[k], state)
        if _harness.any_rank(message is not None):  # stop together: no rank left waiting
            return message
        before = params.clone()
    if _state_numel(state) == 0:
        return f"Not yet: rank {rank} keeps no optimizer state: the momentum lives in `state`."
    return None


def check_zero1_step(fn: Any, timeout_s: float = 60.0) -> str:
    """Check a learner's ZeRO-1 step on 2 Gloo processes; return a message (never raises)."""
    return _harness.verdict(
        _worker,
        (fn,),
        f"Correct! Each rank kept the momentum of its slice only (at most "
        f"{math.ceil(N_PARAMS / 2)} of {N_PARAMS} numbers), updated that slice, and after the "
        f"exchange every rank holds what single-process SGD gives, {STEPS} steps in a row.",
        timeout_s,
    )
