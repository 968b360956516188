"""Exercise: give each rank its exact share of the global batch, then check it.

Data parallelism only reproduces single-process training if the ranks' shards, put together,
are exactly the global batch: no row lost, none seen twice, the same order. The learner writes::

    def my_shard(n_rows: int, rank: int, world_size: int) -> slice:
        ...  # contiguous rows for this rank; sizes differ by at most one

and runs ``print(check_batch_sharding(my_shard))``. The checker tries many (rows, ranks)
combinations, uneven ones included, and explains the first thing that is off. It never raises.
``show_sharding(my_shard, 7, 2)`` prints the rows each rank takes from one batch, for a look
before (or after) the checker.

``reference_shard_rows`` is the solution (for facilitators): the one labkit itself uses.
"""

from __future__ import annotations

from collections.abc import Callable

from labkit.data import shard_rows as reference_shard_rows

__all__ = ["check_batch_sharding", "reference_shard_rows", "show_sharding"]

CASES = [(8, 2), (7, 2), (10, 3), (3, 3), (5, 4), (1, 1), (13, 5)]


def _rows(fn: Callable[[int, int, int], object], n: int, world: int) -> list[list[int]]:
    """The row indices each rank takes, as lists (works for a slice or any sequence)."""
    out = []
    for rank in range(world):
        taken = fn(n, rank, world)
        if isinstance(taken, slice):
            out.append(list(range(n))[taken])
        else:
            out.append([int(i) for i in taken])  # type: ignore[union-attr]
    return out


def show_sharding(fn: Callable[[int, int, int], object], n_rows: int, world_size: int) -> str:
    """The rows each rank takes from a batch of ``n_rows`` under ``fn``, one line per rank.

    Rows that no rank takes, and rows that several ranks take, get a last line of their own.
    Never raises: an error in ``fn`` becomes the answer.
    """
    try:
        shards = _rows(fn, n_rows, world_size)
    except Exception as err:  # noqa: BLE001 (the message is the feedback)
        return f"your function raised {type(err).__name__}: {err}"
    lines = [f"{n_rows} rows on {world_size} ranks:"]
    for rank, shard in enumerate(shards):
        lines.append(f"  rank {rank}: rows {shard} ({len(shard)} rows)")
    taken = [i for shard in shards for i in shard]
    missing = sorted(set(range(n_rows)) - set(taken))
    twice = sorted({i for i in taken if taken.count(i) > 1})
    if missing:
        lines.append(f"  on no rank: rows {missing}")
    if twice:
        lines.append(f"  on more than one rank: rows {twice}")
    return "\n".join(lines)


def check_batch_sharding(fn: Callable[[int, int, int], object]) -> str:
    """Check a learner's ``fn(n_rows, rank, world_size) -> slice``; return a helpful message."""
    for n, world in CASES:
        try:
            shards = _rows(fn, n, world)
        except Exception as err:  # noqa: BLE001 (the message is the feedback)
            return f"Not yet: your function raised {type(err).__name__}: {err} for {n} rows on {world} ranks."
        together = [i for shard in shards for i in shard]
        where = f"{n} rows on {world} ranks"
        if together == list(range(n)):
            sizes = [len(s) for s in shards]
            if max(sizes) - min(sizes) > 1:
                return (
                    f"Almost: with {where} the shards cover the batch, but their sizes {sizes} differ "
                    "by more than one row: one rank waits for another at every step. Spread the "
                    "remainder n_rows % world_size one row each over the first ranks."
                )
            continue
        if len(together) < n:
            missing = sorted(set(range(n)) - set(together))
            return (
                f"Not yet: with {where} rows {missing} belong to no rank (the shards hold "
                f"{len(together)} of {n}). Did you use n_rows // world_size and drop the remainder? "
                "Then the parallel run trains on a smaller batch than the single-process one."
            )
        if len(set(together)) < len(together):
            return (
                f"Not yet: with {where} some rows go to two ranks (shards {shards}). Each row must "
                "be seen exactly once, or its gradient counts twice."
            )
        return (
            f"Not yet: with {where} the shards hold every row once but not in order ({together}). "
            "Keep them contiguous and in rank order, so that putting the shards together gives "
            "the global batch itself."
        )
    return (
        "Correct! Every rank takes a contiguous block, the sizes differ by at most one, and the "
        "shards put together are the global batch, also when it does not divide evenly."
    )
