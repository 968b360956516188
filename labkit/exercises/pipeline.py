"""Exercise: write the 1F1B pipeline schedule of one stage, then check it.

The learner writes::

    def my_1f1b(m: int, stage: int, p: int) -> list[tuple[str, int]]:
        ...  # the order of ("F", micro_batch) and ("B", micro_batch) on this stage

and runs ``print(check_one_f_one_b(my_1f1b))``. 1F1B runs ``p - stage - 1`` warm-up forwards,
then alternates one forward and one backward, then drains the remaining backwards. The checker
compares with labkit's schedule on several pipelines and explains the first thing that is off.

``reference_one_f_one_b`` is the solution (for facilitators): the order labkit's pipeline runs.
"""

from __future__ import annotations

from collections.abc import Callable

from labkit.parallel.pipeline import gpipe_order
from labkit.parallel.pipeline import one_f_one_b_order as reference_one_f_one_b

__all__ = ["check_one_f_one_b", "reference_one_f_one_b"]

CASES = [(4, 0, 2), (4, 1, 2), (8, 0, 4), (8, 2, 4), (3, 0, 4), (1, 0, 2)]


def _warmup(order: list[tuple[str, int]]) -> int:
    """Forwards before the first backward."""
    return next((i for i, (kind, _) in enumerate(order) if kind == "B"), len(order))


def check_one_f_one_b(fn: Callable[[int, int, int], list[tuple[str, int]]]) -> str:
    """Check a learner's ``fn(m, stage, p)``; return a helpful message (never raises)."""
    for m, stage, p in CASES:
        where = f"m={m} micro-batches, stage {stage} of p={p}"
        try:
            got = [(str(kind), int(i)) for kind, i in fn(m, stage, p)]
        except Exception as err:  # noqa: BLE001 (the message is the feedback)
            return f"Not yet: your function raised {type(err).__name__}: {err} for {where}."
        want = reference_one_f_one_b(m, stage, p)
        if got == want:
            continue
        forwards = [i for kind, i in got if kind == "F"]
        backwards = [i for kind, i in got if kind == "B"]
        if sorted(forwards) != list(range(m)) or sorted(backwards) != list(range(m)):
            return (
                f"Not yet: for {where} every micro-batch 0..{m - 1} needs exactly one 'F' and one "
                f"'B'; yours has forwards {forwards} and backwards {backwards}."
            )
        if got == gpipe_order(m, stage, p) and m > 1:
            return (
                f"That is GPipe for {where}: all forwards, then all backwards. It holds the "
                f"activations of all {m} micro-batches at once; 1F1B starts backwards as soon as "
                "it can and holds at most p - stage."
            )
        if backwards != sorted(backwards):
            return f"Not yet: for {where} backwards run in micro-batch order 0, 1, 2...; yours: {backwards}."
        if forwards != sorted(forwards):
            return f"Not yet: for {where} forwards run in micro-batch order; yours: {forwards}."
        expected_warmup = min(p - stage - 1, m)
        if _warmup(got) != _warmup(want):
            return (
                f"Not yet: for {where} the warm-up should be {expected_warmup} forward(s) before the "
                f"first backward (p - stage - 1, at most m); yours runs {_warmup(got)}. The last "
                "stage starts its first backward right after its first forward."
            )
        return f"Close: for {where} the steady state should alternate F and B. Expected {want}, got {got}."
    return (
        "Correct! Warm-up forwards (p - stage - 1), one-forward-one-backward, then the cool-down "
        "backwards: the same order labkit's pp-1f1b runs."
    )
