"""Exercise: the two loops of a ring all-reduce, from send/recv, checked on 2 Gloo processes.

The tensor is cut into ``n`` chunks (``torch.tensor_split``: sizes differ by at most one, some
may be empty). *Reduce-scatter*, ``n - 1`` steps: at step ``s`` rank ``r`` sends chunk
``r - s`` to its right neighbour and adds the chunk ``r - s - 1`` arriving from its left.
Afterwards rank ``r`` holds the complete sum of chunk ``r + 1``. *All-gather*, ``n - 1`` more
steps: the finished chunks travel on around the ring, *overwriting* (received straight into
place). All indices are modulo ``n``. The learner writes, in a cell::

    def my_ring_all_reduce(tensor, group=None):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        right, left = (rank + 1) % n, (rank - 1) % n
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        chunks = list(torch.tensor_split(flat, n))
        incoming = torch.empty_like(chunks[0])
        ...  # TODO: the reduce-scatter loop, then the all-gather loop, with
             # exchange(send, recv, right, left, group): send to the right, receive from the left
        if not tensor.is_contiguous():
            tensor.copy_(flat.view(tensor.shape))
        return tensor

and runs ``print(check_ring_all_reduce(my_ring_all_reduce))``. The checker runs it on 2 ranks
(``world_size=3`` for a longer ring) on tensors of 8, 7, 1 and a non-contiguous 3x5 elements.
Rank ``q`` fills element ``i`` with ``(i + 1) * 16**q``, so each result tells which ranks'
data it sums, how often, and whether it came from the right position. ``exchange`` (send right,
receive left; ``from labkit.exercises.ring import exchange``) is the one tool it needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist  # noqa: F401 (in the namespace of the learner's code)
from torch import Tensor

from labkit.exercises import _harness
from labkit.lessons.collectives import exchange

__all__ = ["check_ring_all_reduce", "exchange", "my_ring_all_reduce"]

BASE = 16.0
SHAPES = [((8,), False), ((7,), False), ((1,), False), ((5, 3), True)]
FORBIDDEN = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather", "broadcast")


def my_ring_all_reduce(tensor: Tensor, group: Any = None) -> Tensor:
    """The placeholder: sum ``tensor`` over the ranks in place, with a ring of exchanges."""
    raise NotImplementedError(
        "write the reduce-scatter loop (n - 1 steps: send chunk rank - s, add the received one "
        "into chunk rank - s - 1) and the all-gather loop (n - 1 steps, receive into place)"
    )


def _input(shape: tuple[int, ...], transpose: bool, rank: int) -> Tensor:
    x = torch.zeros(shape, dtype=torch.float64)
    x = x.t() if transpose else x  # the transpose is a non-contiguous view
    values = torch.arange(1, x.numel() + 1, dtype=torch.float64) * BASE**rank
    return x.copy_(values.view(x.shape))  # element i (in the view's order) is (i + 1) * 16**rank


def _where(x: Tensor, world_size: int) -> str:
    kind = "" if x.is_contiguous() else " (non-contiguous)"
    return f"a tensor of shape {tuple(x.shape)}{kind} on {world_size} ranks"


def _worker(rank: int, world_size: int, shipped: _harness.Shipped) -> dict[str, Any]:
    fn = _harness.load(shipped, dict(globals()))
    used: list[str] = []

    def note(name: str, original: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(name)
        return original(*args, **kwargs)

    message = None
    for shape, transpose in SHAPES:
        x = _input(shape, transpose, rank)
        where = _where(x, world_size)
        with _harness.watching(FORBIDDEN, note):
            returned = _harness.call(fn, f"for {where} your function raised", x, None)
        message = _verdict(x, returned, rank, world_size)
        if _harness.any_rank(message is not None):  # the first wrong case stops every rank
            break
    return {"message": message, "used": used}


def _verdict(x: Tensor, returned: Any, rank: int, n: int) -> str | None:
    """What is wrong with this rank's tensor after the call (None: it holds the sum)."""
    where = _where(x, n)
    message = _diagnose(x, rank, n, where)
    if message and isinstance(returned, Tensor) and returned.shape == x.shape:
        if _diagnose(returned, rank, n, where) is None:
            return (
                f"Not yet: for {where} you return the right sum, but the tensor passed in is "
                "not changed: the all-reduce works in place (sum into tensor itself, through "
                "views of it, and return it)."
            )
    return message


def _counts(out: Tensor, n: int) -> Tensor | None:
    """Per element, how many times each rank's data is in it; None if from the wrong position."""
    flat = out.reshape(-1).to(torch.float64)
    ratio = flat / torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    if not torch.allclose(ratio, ratio.round(), atol=1e-6):
        return None
    value, digits = ratio.round().long(), []
    for _ in range(n):
        digits.append(value % int(BASE))
        value = value // int(BASE)
    return torch.stack(digits, dim=1)  # [numel, n]


def _diagnose(out: Tensor, rank: int, n: int, where: str) -> str | None:
    """The first thing wrong with rank ``rank``'s result, in words (None: it is the sum)."""
    counts = _counts(out, n)
    bounds = torch.tensor_split(torch.arange(out.numel()), n)
    if counts is None:
        return (
            f"Not yet: for {where}, rank {rank}'s result holds values from other positions of "
            "the tensor: a chunk index is off (at step s rank r sends chunk r - s and adds into "
            "chunk r - s - 1 in the reduce-scatter; sends r + 1 - s and receives into r - s in "
            "the all-gather, all modulo n)."
        )
    full = [c for c, idx in enumerate(bounds) if idx.numel() and bool((counts[idx] == 1).all())]
    for c, idx in enumerate(bounds):
        if not idx.numel() or c in full:
            continue
        got = counts[idx[0]]
        if int(got.max()) > 1:
            twice = [q for q in range(n) if got[q] > 1]
            return (
                f"Not yet: for {where}, rank {rank}'s chunk {c} counts rank {twice[0]}'s data "
                f"{int(got[twice[0]])} times: a finished sum is added again. The all-gather "
                "overwrites (receive into the chunk itself, do not add), and the reduce-scatter "
                "takes exactly n - 1 steps."
            )
        summed = [q for q in range(n) if got[q] == 1]
        if not summed:
            return f"Not yet: for {where}, rank {rank}'s chunk {c} is zero: nothing was written."
        head = f"Not yet: for {where}, rank {rank}'s chunk {c} is the sum of only {len(summed)} of {n} ranks"
        if full == [(rank + 1) % n]:
            return (
                f"{head} ({summed}); only chunk {full[0]}, the one its reduce-scatter finished, "
                "is complete: the all-gather loop is missing or stops early (n - 1 steps pass "
                "each finished chunk on around the ring)."
            )
        return (
            f"{head} ({summed}): the reduce-scatter loop stops early, it takes n - 1 steps, "
            "each adding one more rank's chunk."
        )
    return None


def check_ring_all_reduce(fn: Any, world_size: int = 2, timeout_s: float = 60.0) -> str:
    """Run ``fn(tensor, group)`` on ``world_size`` Gloo processes; say what is off (never raises).

    ``fn`` is a function (from a module or a notebook cell) or a string of its source.
    """
    shipped = _harness.ship_all((fn,))
    if isinstance(shipped, str):
        return shipped
    results = _harness.run(_worker, shipped, world_size, timeout_s)
    if isinstance(results, str):
        return results
    used = sorted({name for result in results for name in result["used"]})
    if used:
        return (
            f"Not yet: your function calls dist.{used[0]}, a ready-made collective. Build the sum "
            "from point-to-point messages only (exchange, or dist.isend / dist.irecv)."
        )
    message = next((r["message"] for r in results if r["message"]), None)
    if message:
        return message
    return (
        f"Correct! On {world_size} ranks every element is the sum of every rank's data, exactly "
        f"once, in place, for even, uneven, tiny and non-contiguous tensors. Each rank sent "
        f"2 (n - 1) / n of the tensor: {2 * (world_size - 1) / world_size:.2f} of it here."
    )
