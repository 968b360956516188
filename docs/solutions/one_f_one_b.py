"""Solution (for facilitators) of ``labkit.exercises.pipeline.check_one_f_one_b_any``: 1F1B.

Check it: ``check_one_f_one_b_any(one_f_one_b)`` after loading this file (see
docs/facilitator.md).
"""

from __future__ import annotations


def one_f_one_b(m: int, stage: int, p: int) -> list[tuple[str, int]]:
    """The 1F1B order of stage ``stage`` of ``p``, with ``m`` micro-batches."""
    in_flight = min(p - stage - 1, m)  # forwards before the first backward
    order = [("F", i) for i in range(in_flight)]
    next_forward, next_backward = in_flight, 0
    while next_backward < m:
        if next_forward < m:
            order.append(("F", next_forward))
            next_forward += 1
        order.append(("B", next_backward))
        next_backward += 1
    return order
