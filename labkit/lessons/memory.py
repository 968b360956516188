"""Memory per rank under ZeRO: the paper's formulas, and the bytes a rank really holds.

``zero_memory_formula`` is the ZeRO paper's table for any parameter count and world size. The
notebooks put it beside ``RunResult.memory``, what each rank measured while training (formula =
prediction, storages = measurement; ``labkit.memory`` does the counting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PAPER_STAGE", "zero_memory_formula"]

# Which ZeRO stage each strategy is.
PAPER_STAGE = {
    "single": "DP",
    "dp-naive": "DP",
    "dp-bucketed": "DP",
    "ddp": "DP",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "fsdp": "ZeRO-3",
}


def zero_memory_formula(
    n_params: int,
    world_size: int,
    *,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    optimizer_bytes: int = 8,
) -> pd.DataFrame:
    """Bytes per rank for parameters, gradients and optimizer state at each ZeRO stage.

    The defaults are fp32 training with Adam (two fp32 moments per parameter); the paper's own
    table uses mixed precision (2 + 2 + 12 bytes).
    """
    import pandas as pd

    psi, n = n_params, world_size
    shard = {
        "DP": (1, 1, 1),
        "ZeRO-1": (1, 1, n),
        "ZeRO-2": (1, n, n),
        "ZeRO-3": (n, n, n),
    }
    rows = []
    for stage, (dp, dg, do) in shard.items():
        p, g, o = param_bytes * psi / dp, grad_bytes * psi / dg, optimizer_bytes * psi / do
        rows.append(
            {
                "stage": stage,
                "world_size": n,
                "params_bytes": p,
                "grads_bytes": g,
                "optimizer_bytes": o,
                "total_bytes": p + g + o,
            }
        )
    return pd.DataFrame(rows)
