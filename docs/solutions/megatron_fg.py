"""Solution (for facilitators) of ``labkit.exercises.megatron_fg``: Megatron's f and g.

Check it: ``check_f_g(f_forward, f_backward, g_forward, g_backward)`` after loading this file
(see docs/facilitator.md).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def _summed(t: Tensor, group: Any) -> Tensor:
    """``t`` summed over the ranks of ``group`` (in place on a contiguous tensor)."""
    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def f_forward(x: Tensor, group: Any) -> Tensor:
    """f going forward: every rank already holds the same x."""
    return x


def f_backward(grad: Tensor, group: Any) -> Tensor:
    """f going backward: each rank's slice gave a partial gradient of x; add them up."""
    return _summed(grad, group)


def g_forward(x: Tensor, group: Any) -> Tensor:
    """g going forward: the ranks' partial products add up to the layer's output."""
    return _summed(x, group)


def g_backward(grad: Tensor, group: Any) -> Tensor:
    """g going backward: the output's gradient is replicated already."""
    return grad
