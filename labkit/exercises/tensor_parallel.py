"""Exercise: split a matrix multiply by rows across ranks (Megatron's row-parallel layer).

For ``Y = X @ W`` with ``W`` of shape [d_in, d_out]: rank r holds the rows ``W[r]`` of a row split
and the matching columns ``X[:, r]`` of the input; it computes a *partial* product of the full
output's shape, and the all-reduce sums the partials. The learner writes::

    def my_row_parallel(x: Tensor, w: Tensor, world_size: int) -> list[Tensor]:
        ...  # one partial product per rank; their sum must be x @ w

and runs ``print(check_row_parallel(my_row_parallel))``. It never raises on a wrong answer.

``reference_row_parallel`` is the solution (for facilitators).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["check_row_parallel", "reference_row_parallel"]


def reference_row_parallel(x: Tensor, w: Tensor, world_size: int) -> list[Tensor]:
    """Partial products of a row split: ``x[..., rows_r] @ w[rows_r, :]`` for each rank r."""
    w_rows = torch.chunk(w, world_size, dim=0)
    x_cols = torch.split(x, [part.shape[0] for part in w_rows], dim=-1)
    return [xi @ wi for xi, wi in zip(x_cols, w_rows)]


def check_row_parallel(fn: Callable[[Tensor, Tensor, int], list[Tensor]]) -> str:
    """Check a learner's row-parallel split; return a helpful message."""
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out, world in [(8, 6, 2), (12, 5, 3), (8, 8, 4)]:
        x = torch.randn(3, d_in, generator=gen, dtype=torch.float64)
        w = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64)
        where = f"X [3, {d_in}], W [{d_in}, {d_out}] on {world} ranks"
        try:
            parts = list(fn(x, w, world))
        except Exception as err:  # noqa: BLE001 (the message is the feedback)
            return f"Not yet: your function raised {type(err).__name__}: {err} for {where}."
        if len(parts) != world:
            return f"Not yet: for {where} return one partial product per rank ({world}), not {len(parts)}."
        want = reference_row_parallel(x, w, world)
        shapes = [tuple(p.shape) for p in parts]
        if shapes != [tuple(p.shape) for p in want]:
            if all(s[-1] == d_out // world for s in shapes if len(s) == 2):
                return (
                    f"Not yet: for {where} your partials have shapes {shapes}: that is a *column* "
                    "split (each rank computes some output columns, to be concatenated). A row "
                    f"split gives every rank a partial of the full output shape {(3, d_out)}."
                )
            return f"Not yet: for {where} each partial should have the output's shape {(3, d_out)}; yours: {shapes}."
        total = torch.stack(parts).sum(0)
        if not torch.allclose(total, x @ w):
            return (
                f"Not yet: for {where} the partials do not sum to X @ W. Rank r must multiply the "
                "columns of X that match *its* rows of W (the same index range for both)."
            )
        if not all(torch.allclose(a, b) for a, b in zip(parts, want)):
            return (
                f"Almost: for {where} the sum is right, but the partials are not what each rank "
                "can compute from its own shard (for example every rank computing X @ W / "
                "world_size needs all of W). Rank r holds W's rows r*k:(r+1)*k only."
            )
    return (
        "Correct! Each rank multiplies its slice of X by its rows of W; the all-reduce (a sum) "
        "of the partials is X @ W. Megatron pairs this with a column split before it, so the "
        "slice of X is exactly what the previous layer's rank already holds."
    )
