"""The alpha-beta model of a collective, and fitting alpha and beta from measured all-reduces.

A message costs ``alpha + bytes * beta``: a fixed latency and a per-byte time. A ring over ``n``
ranks does ``n - 1`` steps for a reduce-scatter or an all-gather, each moving ``1/n`` of the
tensor, and an all-reduce is the two back to back; a tree all-reduce takes ``2 log2 n`` steps of
the whole tensor, better for small messages (NCCL picks whichever is faster; so does this model).

``fit_alpha_beta`` turns all-reduce timings (``labkit.perf.allreduce_times``: this machine's
Gloo, or NCCL on a GPU) into one ``(alpha, beta)`` per group size by least squares over sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from labkit.plan.hardware import Cluster

__all__ = ["KINDS", "collective_time", "fit_alpha_beta"]

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send")


def _ring_steps(kind: str, n: int) -> tuple[int, float]:
    """(latency steps, bytes moved per byte of tensor) of a ring collective over n ranks."""
    if kind == "all_reduce":
        return 2 * (n - 1), 2 * (n - 1) / n
    if kind in ("reduce_scatter", "all_gather"):
        return n - 1, (n - 1) / n
    if kind == "broadcast":  # pipelined along the ring
        return n - 1, 1.0
    if kind == "send":
        return 1, 1.0
    raise ValueError(f"kind={kind!r} is unknown: allowed: {', '.join(KINDS)}")


def collective_time(
    kind: str, nbytes: float, group_size: int, cluster: Cluster, stride: int = 1
) -> float:
    """Seconds one collective of ``nbytes`` (the whole tensor) takes over ``group_size`` ranks.

    ``stride``: how far apart the group's ranks are (tp neighbours 1, dp replicas tp*cp...),
    which decides whether the ring leaves the node. Measured ``cluster.collectives`` (this
    machine) replace the link's datasheet figures: there ``alpha`` is one whole all-reduce's
    latency and ``beta`` the seconds per bus byte.
    """
    n = group_size if kind != "send" else 2
    if group_size <= 1 or nbytes <= 0:
        return 0.0
    steps, factor = _ring_steps(kind, n)
    fitted = cluster.collectives.get(n) or cluster.collectives.get(group_size)
    if fitted is not None:
        alpha, beta = fitted  # per whole all-reduce; scale by this kind's share of its steps
        return alpha * steps / (2 * (n - 1)) + factor * nbytes * beta
    link = cluster.link_for(group_size, stride)
    ring = steps * link.latency_s + factor * nbytes * link.beta_s_per_B
    if kind != "all_reduce":
        return ring
    tree = 2 * math.ceil(math.log2(n)) * link.latency_s + 2 * nbytes * link.beta_s_per_B
    return min(ring, tree)


def fit_alpha_beta(rows: Iterable[Mapping[str, Any]]) -> dict[int, tuple[float, float]]:
    """``{world_size: (alpha_s, beta_s_per_bus_byte)}`` from all-reduce benchmark rows.

    Fits ``time = alpha + bus_bytes * beta`` (bus bytes ``2 (n-1)/n * size``) by least squares
    over the sizes measured at each world size, using torch's own all-reduce rows. Negative fits
    (noise on a loaded machine) are clamped to zero.
    """
    by_n: dict[int, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("algorithm", "torch all_reduce") != "torch all_reduce":
            continue
        n = int(row["world_size"])
        bus = 2 * (n - 1) / n * float(row["size_bytes"])
        by_n.setdefault(n, []).append((bus, float(row["time_s"])))
    fits = {}
    for n, points in by_n.items():
        if len(points) < 2:
            raise ValueError(f"fit_alpha_beta: world size {n} needs at least two sizes")
        # Weighted by 1/time^2: a relative fit, so the small sizes (alpha) count as much as
        # the large ones (beta).
        w = [1 / (y * y) for _, y in points]
        sw = sum(w)
        mx = sum(wi * x for wi, (x, _) in zip(w, points, strict=True)) / sw
        my = sum(wi * y for wi, (_, y) in zip(w, points, strict=True)) / sw
        sxx = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, points, strict=True))
        sxy = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, points, strict=True))
        beta = max(0.0, sxy / sxx) if sxx else 0.0
        alpha = max(0.0, my - beta * mx)
        fits[n] = (float(alpha), float(beta))
    return fits
