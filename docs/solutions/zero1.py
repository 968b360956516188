"""Solution (for facilitators) of ``labkit.exercises.zero1``: a ZeRO-1 step, SGD with momentum.

Check it: ``check_zero1_step(zero1_step)`` after loading this file (see docs/facilitator.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@torch.no_grad()
def zero1_step(
    params: Tensor, grad: Tensor, state: dict, lr: float, momentum: float, group: Any = None
) -> None:
    """Update this rank's slice with its own momentum, then every owner broadcasts its slice."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    slices = torch.tensor_split(params, n)  # views: writing into them writes params
    mine = slices[rank]
    my_grad = torch.tensor_split(grad, n)[rank]
    if "momentum" not in state:
        state["momentum"] = torch.zeros_like(mine)  # only this rank's share of the state
    buf = state["momentum"]
    buf.mul_(momentum).add_(my_grad)
    mine.sub_(lr * buf)
    for owner, piece in enumerate(slices):
        if piece.numel():
            dist.broadcast(piece, group=group, group_src=owner)
