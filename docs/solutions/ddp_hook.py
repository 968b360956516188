"""Solution (for facilitators) of ``labkit.exercises.ddp_hook``: a bucketed, overlapped DDP hook.

Check it: ``check_bucket_hook(make_hook, finish_grad_sync)`` after loading this file (see
docs/facilitator.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def make_hook(bucket: Any, view: Tensor, group: Any = None) -> Any:
    """The hook of one parameter: move its gradient into the bucket; launch a complete bucket."""

    def hook(param: Tensor) -> None:
        if param.grad is not view:
            view.copy_(param.grad)
            param.grad = view  # from now on the gradient *is* the bucket's slice
        bucket.pending -= 1
        if bucket.pending == 0:  # the last gradient of this bucket: start, do not wait
            bucket.work = dist.all_reduce(bucket.buffer, group=group, async_op=True)

    return hook


@torch.no_grad()
def finish_grad_sync(buckets: list[Any], world_size: int) -> None:
    """Wait for each bucket's all-reduce, turn the sum into the mean, re-arm the bucket."""
    for bucket in buckets:
        bucket.work.wait()
        bucket.work = None
        bucket.buffer /= world_size
        bucket.pending = len(bucket.params)
