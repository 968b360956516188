"""Collectives from first principles: a ring all-reduce built from send/recv, and its benchmark.

Data parallelism lives on one collective, the *all-reduce*: every rank starts with a tensor and
ends with the element-wise sum over all ranks. ``dist.all_reduce`` does it in one call; this file
rebuilds it from point-to-point messages, the way NCCL and Gloo do for large tensors:

1. ``ring_all_reduce``: cut the tensor into ``n`` chunks and pass them around a ring of ranks.
   *Reduce-scatter* (``n - 1`` steps): each rank sends one chunk to its right neighbour and adds
   the chunk arriving from its left; afterwards rank ``r`` holds the complete sum of chunk
   ``r + 1``. *All-gather* (``n - 1`` more steps): the finished chunks travel once more around
   the ring, overwriting. Each rank sends ``2 (n - 1) / n`` times the tensor in total, whatever
   ``n`` is: that is why the ring is *bandwidth-optimal*.
2. ``allreduce_benchmark``: times ``dist.all_reduce`` and ``ring_all_reduce`` for several sizes
   and reports the two bandwidths that nccl-tests report: *algorithm bandwidth* ``size / time``
   and *bus bandwidth* ``algbw * 2 (n - 1) / n``, which corrects for the ring's traffic so it can
   be compared with the link's speed.
3. ``spawn`` and ``run_collectives_demo``: start ``n`` processes from a notebook cell, each inside
   a process group, run a module-level function on every rank and return what each returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from labkit.perf import bus_bandwidth, collective_device, time_per_call
from labkit.supervisor import spawn

if TYPE_CHECKING:
    import pandas as pd
    from torch.distributed import ProcessGroup

__all__ = [
    "exchange",
    "allreduce_benchmark",
    "bus_bandwidth",
    "ring_all_reduce",
    "run_collectives_demo",
    "spawn",
]


# ---------------------------------------------------------------------------------------------
# 1. The ring all-reduce
# ---------------------------------------------------------------------------------------------


def exchange(
    send: torch.Tensor, recv: torch.Tensor, right: int, left: int, group: ProcessGroup | None
) -> None:
    """Send ``send`` to the right neighbour while receiving ``recv`` from the left one.

    Both are posted before either is waited on: with blocking calls every rank would first try
    to send and, on some backends, the whole ring would wait forever for a receiver. An empty
    chunk is neither sent nor received: the neighbour cuts the tensor the same way, so it skips
    the matching message too.
    """
    works = []
    if send.numel():
        works.append(dist.isend(send, group=group, group_dst=right))
    if recv.numel():
        works.append(dist.irecv(recv, group=group, group_src=left))
    for work in works:
        work.wait()


@torch.no_grad()
def ring_all_reduce(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place, with a ring of send/recv; return it.

    The result equals ``dist.all_reduce(tensor, op=SUM, group=group)`` (up to the order in which
    floating-point numbers are added). Any size works: the chunks differ by at most one element,
    and when the tensor has fewer elements than there are ranks some chunks are simply empty.
    Every rank of ``group`` must call it with a tensor of the same shape and dtype.
    """
    n = dist.get_world_size(group)
    if n == 1:
        return tensor
    rank = dist.get_rank(group)
    right, left = (rank + 1) % n, (rank - 1) % n
    # Work on one flat, contiguous vector: a view of the tensor when possible, else a copy.
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
    chunks = list(torch.tensor_split(flat, n))  # views; sizes differ by at most one
    incoming = torch.empty_like(chunks[0])  # the first chunk is the largest

    # Reduce-scatter: at step s rank r sends chunk r - s to the right and adds the chunk r - s - 1
    # arriving from the left (which its left neighbour sent as *its* chunk "r - s").
    for s in range(n - 1):
        send, target = chunks[(rank - s) % n], chunks[(rank - s - 1) % n]
        buffer = incoming[: target.numel()]
        exchange(send, buffer, right, left, group)
        target.add_(buffer)
    # Rank r now holds the complete sum of chunk r + 1. All-gather: pass the finished chunks on
    # around the ring, receiving straight into place.
    for s in range(n - 1):
        send, target = chunks[(rank + 1 - s) % n], chunks[(rank - s) % n]
        exchange(send, target, right, left, group)

    if not tensor.is_contiguous():  # we worked on a copy: write the result back
        tensor.copy_(flat.view(tensor.shape))
    return tensor


# ---------------------------------------------------------------------------------------------
# 2. Measuring it
# ---------------------------------------------------------------------------------------------


def allreduce_benchmark(
    sizes_bytes: Sequence[int],
    iters: int = 10,
    group: ProcessGroup | None = None,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time ``dist.all_reduce`` and ``ring_all_reduce`` on float32 tensors of each size.

    Call it on every rank of ``group`` (inside workers). Returns one row per (algorithm, size)
    with ``time_s`` (mean per call, slowest rank), ``algbw_GBps`` (size / time),
    ``busbw_GBps`` (nccl-tests' bus bandwidth) and ``max_abs_diff``, the largest difference
    between the two algorithms' results on the same random input (a correctness check).
    """
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = collective_device(group)
    algorithms: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
        ("torch all_reduce", lambda t: dist.all_reduce(t, group=group)),
        ("ring (send/recv)", lambda t: ring_all_reduce(t, group=group)),
    ]
    rows = []
    for size in sizes_bytes:
        numel = max(1, int(size) // 4)
        # Correctness first: both algorithms on the same rank-dependent random input.
        gen = torch.Generator().manual_seed(1000 + rank)
        data = torch.randn(numel, generator=gen).to(device)
        expected, ours = data.clone(), data.clone()
        dist.all_reduce(expected, group=group)
        ring_all_reduce(ours, group=group)
        diff = float((expected - ours).abs().max())
        # Zeros for timing: repeated sums of zeros stay zeros (no overflow, no denormals).
        x = torch.zeros(numel, device=device)
        for name, fn in algorithms:
            seconds = time_per_call(fn, x, iters, warmup, group)
            algbw = numel * 4 / seconds / 1e9
            rows.append(
                {
                    "algorithm": name,
                    "size_bytes": numel * 4,
                    "world_size": n,
                    "backend": str(dist.get_backend(group)),
                    "time_s": seconds,
                    "algbw_GBps": algbw,
                    "busbw_GBps": bus_bandwidth(algbw, n),
                    "max_abs_diff": diff,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Running a function on N processes, from a notebook (labkit.supervisor.spawn)
# ---------------------------------------------------------------------------------------------


def _demo_worker(
    rank: int, world_size: int, sizes_bytes: Sequence[int], iters: int
) -> list[dict[str, Any]]:
    """Worker of ``run_collectives_demo``: every rank benchmarks; all report the same rows."""
    return allreduce_benchmark(sizes_bytes, iters=iters)


DEFAULT_SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)  # 4 KiB .. 8 MiB


def run_collectives_demo(
    world_size: int = 2,
    sizes: Sequence[int] = DEFAULT_SIZES,
    iters: int = 10,
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int | None = None,
) -> pd.DataFrame:
    """Benchmark ``dist.all_reduce`` against ``ring_all_reduce`` on ``world_size`` processes.

    For a notebook cell: returns a DataFrame with one row per (algorithm, size): ``time_s``,
    ``algbw_GBps``, ``busbw_GBps`` and ``max_abs_diff`` (ring vs torch on the same input).
    """
    import pandas as pd

    per_rank = spawn(
        _demo_worker,
        world_size,
        (tuple(sizes), iters),
        backend=backend,
        timeout_s=timeout_s,
        threads=threads,
    )
    return pd.DataFrame(per_rank[0])
