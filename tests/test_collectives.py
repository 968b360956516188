"""The ring all-reduce, built from send/recv, against dist.all_reduce on real Gloo processes.

Three ranks, not two: with two ranks the left and right neighbours are the same process and a
wrong chunk index can go unnoticed. Sizes include ones smaller than the world size (empty chunks)
and ones not divisible by it. ``spawn`` (the notebook helper) starts and reaps the processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from labkit import WorkerError
from labkit.lessons.collectives import bus_bandwidth, ring_all_reduce, run_collectives_demo, spawn

RING_WORLD = 3
SIZES = [1, 2, 3, 5, 7, 10, 64, 1001]  # 1, 2 < world size; 5, 7, 10, 64, 1001 not divisible by 3


def _inputs(rank: int, size: int) -> dict[str, torch.Tensor]:
    """Each rank's inputs: exact-sum integers (as float32 and int64), random float64."""
    gen = torch.Generator().manual_seed(1000 * size + rank)
    ints = torch.randint(-1000, 1000, (size,), generator=gen)
    return {
        "float32_ints": ints.float(),  # small integers: every summation order is exact
        "int64": ints.clone(),
        "float64": torch.randn(size, generator=gen, dtype=torch.float64),
    }


def _ring_worker(rank: int, world_size: int) -> dict[str, object]:
    """Every case on every rank: (input, ring result, torch result, returned the same tensor)."""
    out: dict[str, object] = {}
    for size in SIZES:
        for kind, x in _inputs(rank, size).items():
            ours, theirs = x.clone(), x.clone()
            returned = ring_all_reduce(ours)
            dist.all_reduce(theirs)
            out[f"{kind}-{size}"] = (x, ours, theirs, returned is ours)
    # A non-contiguous 2-D tensor (a transpose) is reduced in place as well.
    x = (torch.arange(15.0).view(3, 5) * (rank + 1)).t()
    ours = x.clone().t().contiguous().t()  # same values, same non-contiguous layout
    assert not ours.is_contiguous()
    ring_all_reduce(ours)
    out["transposed"] = (x, ours, None, True)
    return out


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()  # rank 0 waits here until the parent stops it


@pytest.fixture(scope="module")
def ring_results() -> list[dict[str, object]]:
    """Run the ring worker once on three ranks."""
    return spawn(_ring_worker, RING_WORLD, timeout_s=120, threads=1)


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["float32_ints", "int64", "float64"])
def test_ring_all_reduce_equals_all_reduce(ring_results, size, kind):
    key = f"{kind}-{size}"
    expected = sum(r[key][0] for r in ring_results)  # the sum, computed here independently
    for rank, results in enumerate(ring_results):
        x, ours, theirs, returned_same = results[key]
        assert returned_same, "ring_all_reduce must reduce in place and return its argument"
        assert ours.shape == x.shape and ours.dtype == x.dtype
        if kind == "float64":
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(ours, theirs), f"rank {rank}: ring differs from all_reduce"
            assert torch.equal(ours, expected), f"rank {rank}: ring is not the sum"


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ring_all_reduce_non_contiguous(ring_results):
    expected = sum(r["transposed"][0] for r in ring_results)
    for results in ring_results:
        assert torch.equal(results["transposed"][1], expected)


def test_bus_bandwidth_is_the_nccl_tests_factor():
    assert bus_bandwidth(10.0, 2) == pytest.approx(10.0)
    assert bus_bandwidth(10.0, 4) == pytest.approx(15.0)  # 2 * 3 / 4
    assert bus_bandwidth(10.0, 8) == pytest.approx(17.5)  # 2 * 7 / 8


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_collectives_demo_reports_both_algorithms():
    sizes = [4, 4 * 1001]  # one element, and 1001 (odd, not divisible by 2)
    frame = run_collectives_demo(world_size=2, sizes=sizes, iters=2, timeout_s=120)
    assert len(frame) == 2 * len(sizes)
    assert set(frame["algorithm"]) == {"torch all_reduce", "ring (send/recv)"}
    assert sorted(frame["size_bytes"].unique()) == sizes
    assert (frame["time_s"] > 0).all()
    torch.testing.assert_close(
        torch.tensor(frame["algbw_GBps"].to_numpy()),
        torch.tensor((frame["size_bytes"] / frame["time_s"] / 1e9).to_numpy()),
    )
    assert (frame["busbw_GBps"] == frame["algbw_GBps"]).all()  # 2 (n - 1) / n = 1 for n = 2
    assert (frame["max_abs_diff"] < 1e-5).all()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_spawn_names_the_failing_rank():
    with pytest.raises(WorkerError) as info:
        spawn(_failing_worker, 2, timeout_s=60, threads=1)
    assert info.value.rank == 1
    assert "rank one is unhappy" in str(info.value)
