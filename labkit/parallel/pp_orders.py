"""Pipeline schedules as data: the ordered actions one stage (one rank) performs in a flush.

An action is ``(kind, micro_batch)`` or ``(kind, micro_batch, chunk)``:

* ``"F"``: the forward of a micro-batch through one of this rank's chunks of layers;
* ``"B"``: its backward (with ``"W"`` in the schedule: only the gradient of the input);
* ``"W"``: the gradient of the weights, split off the backward (zero-bubble schedules).

``chunk`` is which of the rank's ``v`` chunks (virtual stages) runs it; it is 0 when omitted.
Rank ``r`` of ``p`` owns virtual stages ``r, r + p, r + 2p, ...``: chunk ``c`` of rank ``r`` is
virtual stage ``c * p + r``. Every schedule is a function ``(n_micro, stage, n_stages, n_chunks)
-> list of actions``; ``labkit.lessons.pipeline.simulate_schedule`` runs any of them on paper and
``labkit.parallel.pipeline.Pipeline`` on real processes.

Bubble (idle fraction of a stage, equal stages, free communication, forward F, backward B; with
the split, B + W):

============== ================================== =============================================
schedule       order                              bubble fraction
============== ================================== =============================================
gpipe          all F, then all B                  (p - 1) / (m + p - 1)
1f1b           warm-up F, 1F1B, cool-down B       (p - 1) / (m + p - 1), memory p - s
interleaved    Megatron's 1F1B over v chunks      (p - 1) / (v m + p - 1)
zb-h1          1F1B with W moved into the bubble  (p-1)(F+B-W) / (m (F+B+W) + (p-1)(F+B-W))
============== ================================== =============================================
"""

from __future__ import annotations

from collections.abc import Callable

Action = tuple  # ("F" | "B" | "W", micro_batch) or (..., micro_batch, chunk)
Order = list[Action]

__all__ = [
    "ORDERS",
    "Action",
    "Order",
    "bubble_formula",
    "gpipe_order",
    "interleaved_1f1b_order",
    "one_f_one_b_order",
    "zb_h1_order",
]


def gpipe_order(n_micro: int, stage: int, n_stages: int, n_chunks: int = 1) -> Order:
    """GPipe (Huang et al. 2019): every forward, then every backward.

    Simple, but each stage holds the activations of all ``n_micro`` micro-batches at once.
    """
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]


def one_f_one_b_order(n_micro: int, stage: int, n_stages: int, n_chunks: int = 1) -> Order:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): same bubble as GPipe, far less memory.

    Stage ``s`` runs ``p - s - 1`` warm-up forwards (just enough to keep the stages after it
    busy), then alternates one forward with one backward, then finishes the backwards. A
    micro-batch's activations are freed by its backward, so at most ``p - s`` are alive.
    """
    warmup = min(n_stages - stage - 1, n_micro)
    order: Order = [("F", i) for i in range(warmup)]
    for i in range(n_micro - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(n_micro - warmup, n_micro)]
    return order


def interleaved_1f1b_order(n_micro: int, stage: int, n_stages: int, n_chunks: int = 2) -> Order:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM; Llama 3's pre-training).

    Each rank holds ``v = n_chunks`` non-adjacent chunks of layers, so a micro-batch visits every
    rank ``v`` times, each visit ``1/v`` of the work: the fill and drain of the pipeline shrink
    ``v``-fold, and so does the bubble, for ``v`` times the point-to-point messages. Forwards go
    through the chunks in groups of ``p`` micro-batches (micro-batches ``0..p-1`` through chunk 0,
    then through chunk 1, ...), backwards in reverse chunk order. Rank ``r`` warms up with
    ``2 (p - r - 1) + (v - 1) p`` forwards, then alternates one forward and one backward.
    Needs ``n_micro`` to be a multiple of ``p``.
    """
    p, v = n_stages, n_chunks
    if n_micro % p:
        raise ValueError(
            f"interleaved 1F1B needs micro_batches a multiple of pp={p}, got {n_micro}"
        )
    total = n_micro * v

    def forward(k: int) -> Action:
        return ("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def backward(k: int) -> Action:
        return ("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    warmup = min(2 * (p - stage - 1) + (v - 1) * p, total)
    order: Order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def zb_h1_order(n_micro: int, stage: int, n_stages: int, n_chunks: int = 1) -> Order:
    """ZB-H1 (Qi et al. 2024, *Zero Bubble Pipeline Parallelism*): 1F1B with the backward split.

    ``B`` computes only the gradient of the stage's input, which the previous stage is waiting
    for; ``W``, the gradient of the weights, waits. Stage ``s`` warms up like 1F1B, holds back
    ``s`` of its W passes during the steady phase (the later a stage, the more its backward is
    on the critical path of the stages before it) and runs one after each backward of the
    cool-down, where 1F1B would idle. The bubble shrinks from ``(p - 1)(F + B + W)`` to
    ``(p - 1)(F + B - W)`` with the same number of micro-batches in flight as 1F1B (same peak
    activation memory), when ``m >= p``: with fewer micro-batches than stages there is no
    steady phase to hold W passes back in. (The hold-back ``s`` was found by searching all warm-up and hold-back
    counts with the simulator for p = 2 and 3; the tests check the formula for p up to 8.)
    """
    warmup = min(n_stages - stage - 1, n_micro)
    held = stage  # W passes kept back for the cool-down
    order: Order = [("F", i) for i in range(warmup)]
    pending: list[int] = []
    for i in range(n_micro - warmup):
        order += [("F", warmup + i), ("B", i)]
        pending.append(i)
        if len(pending) > held:
            order.append(("W", pending.pop(0)))
    for i in range(n_micro - warmup, n_micro):
        order.append(("B", i))
        pending.append(i)
        order.append(("W", pending.pop(0)))
    order += [("W", i) for i in pending]
    return order


def bubble_formula(
    schedule: str,
    n_micro: int,
    n_stages: int,
    n_chunks: int = 1,
    forward: float = 1.0,
    backward: float = 1.0,
    weight: float = 1.0,
) -> float:
    """The textbook bubble fraction of ``schedule`` (the table above)."""
    p, m, v = n_stages, n_micro, n_chunks
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb-h1":
        idle = (p - 1) * (forward + backward - weight)
        return idle / (m * (forward + backward + weight) + idle)
    raise ValueError(f"no bubble formula for schedule {schedule!r}")


# Hand-written schedules by name, each a row of labkit.parallel.presets.PP_SCHEDULES run by
# labkit.parallel.pipeline.Pipeline (interleaved-1f1b with TrainConfig.pp_virtual_stages chunks,
# zb-h1 with the split backward of labkit.parallel.split_backward).
ORDERS: dict[str, Callable[..., Order]] = {
    "gpipe": gpipe_order,
    "1f1b": one_f_one_b_order,
    "interleaved-1f1b": interleaved_1f1b_order,
    "zb-h1": zb_h1_order,
}
