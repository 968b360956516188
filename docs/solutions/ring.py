"""Solution (for facilitators) of ``labkit.exercises.ring``: a ring all-reduce from send/recv.

Check it: ``check_ring_all_reduce(ring_all_reduce)`` after loading this file (see
docs/facilitator.md). Written from scratch, with its own exchange: no labkit reference inside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _swap(send: Tensor, recv: Tensor, right: int, left: int, group: Any) -> None:
    """Post the send to the right and the receive from the left, then wait for both."""
    pending = []
    if send.numel():
        pending.append(dist.isend(send, group=group, group_dst=right))
    if recv.numel():
        pending.append(dist.irecv(recv, group=group, group_src=left))
    for work in pending:
        work.wait()


@torch.no_grad()
def ring_all_reduce(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group``, in place, and return it."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    if n == 1:
        return tensor
    right, left = (rank + 1) % n, (rank - 1) % n
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    pieces = torch.tensor_split(work.view(-1), n)
    scratch = torch.empty_like(pieces[0])
    for step in range(n - 1):  # reduce-scatter
        mine, theirs = pieces[(rank - step) % n], pieces[(rank - step - 1) % n]
        landing = scratch[: theirs.numel()]
        _swap(mine, landing, right, left, group)
        theirs += landing
    for step in range(n - 1):  # all-gather: rank r starts with the finished piece r + 1
        _swap(pieces[(rank + 1 - step) % n], pieces[(rank - step) % n], right, left, group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor
