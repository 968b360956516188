"""The exercise checkers of notebooks 03-05: the solution passes, typical mistakes get their hint."""

import torch

from labkit.exercises.data_parallel import (
    check_batch_sharding,
    reference_shard_rows,
    show_sharding,
)
from labkit.exercises.pipeline import check_one_f_one_b, reference_one_f_one_b
from labkit.exercises.tensor_parallel import check_row_parallel, reference_row_parallel
from labkit.parallel.pipeline import gpipe_order


def test_batch_sharding_checker():
    assert check_batch_sharding(reference_shard_rows).startswith("Correct")

    def drops_remainder(n, rank, world):
        k = n // world
        return slice(rank * k, (rank + 1) * k)

    def strided(n, rank, world):
        return slice(rank, n, world)

    def last_takes_rest(n, rank, world):
        k = n // world
        return slice(rank * k, n if rank == world - 1 else (rank + 1) * k)

    assert "belong to no rank" in check_batch_sharding(drops_remainder)
    assert "not in order" in check_batch_sharding(strided)
    assert "differ by more than one" in check_batch_sharding(last_takes_rest)
    assert "raised" in check_batch_sharding(lambda n, r, w: 1 / 0)


def test_show_sharding_names_each_ranks_rows_and_the_lost_ones():
    """Notebook 03's batch of 7 on 2 ranks: 4 + 3 rows, or row 6 lost by n // world_size."""
    assert show_sharding(reference_shard_rows, 7, 2).splitlines() == [
        "7 rows on 2 ranks:",
        "  rank 0: rows [0, 1, 2, 3] (4 rows)",
        "  rank 1: rows [4, 5, 6] (3 rows)",
    ]
    drops = show_sharding(lambda n, r, w: slice(r * (n // w), (r + 1) * (n // w)), 7, 2)
    assert drops.splitlines()[-1] == "  on no rank: rows [6]"
    assert "on more than one rank: rows [0, 1, 2]" in show_sharding(
        lambda n, r, w: slice(0, n), 3, 2
    )
    assert "raised ZeroDivisionError" in show_sharding(lambda n, r, w: 1 / 0, 3, 2)


def test_one_f_one_b_checker():
    assert check_one_f_one_b(reference_one_f_one_b).startswith("Correct")
    assert "That is GPipe" in check_one_f_one_b(gpipe_order)

    def no_warmup(m, stage, p):
        return [x for i in range(m) for x in (("F", i), ("B", i))]

    assert "warm-up" in check_one_f_one_b(no_warmup)
    assert "exactly one" in check_one_f_one_b(lambda m, s, p: [("F", 0), ("B", 0)])


def test_row_parallel_checker():
    assert check_row_parallel(reference_row_parallel).startswith("Correct")

    def column_split(x, w, world):
        return [x @ part for part in torch.chunk(w, world, dim=1)]

    def everyone_everything(x, w, world):
        return [x @ w / world for _ in range(world)]

    def mismatched_slices(x, w, world):
        rows = torch.chunk(w, world, dim=0)
        cols = list(torch.chunk(x, world, dim=-1))
        return [c @ r for c, r in zip(reversed(cols), rows)]

    assert "column" in check_row_parallel(column_split)
    assert "Almost" in check_row_parallel(everyone_everything)
    assert "do not sum" in check_row_parallel(mismatched_slices)
