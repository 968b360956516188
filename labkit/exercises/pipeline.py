"""Exercise: write the 1F1B pipeline schedule of one stage, then check it.

The learner writes::

    def my_1f1b(m: int, stage: int, p: int) -> list[tuple[str, int]]:
        ...  # the order of ("F", micro_batch) and ("B", micro_batch) on this stage

and runs ``print(check_one_f_one_b(my_1f1b))``. 1F1B runs ``p - stage - 1`` warm-up forwards,
then alternates one forward and one backward, then drains the remaining backwards. The checker
compares with labkit's schedule on several pipelines and explains the first thing that is off.

``check_one_f_one_b_any(fn)`` is the thorough version: every stage of every pipeline with
p = 1..8 stages and m = 1..12 micro-batches against ``labkit.parallel.pp_orders``, in process.
Besides the mistakes above it names a backward before its forward, micro-batches that do not
exist (an uncapped warm-up when m < p) and stages that would wait for each other forever (the
orders of all stages run together on paper). ``my_one_f_one_b`` is its placeholder.

``reference_one_f_one_b`` is the solution (for facilitators): the order labkit's pipeline runs.
"""

from __future__ import annotations

from collections.abc import Callable

from labkit.parallel.pipeline import gpipe_order
from labkit.parallel.pipeline import one_f_one_b_order as reference_one_f_one_b
from labkit.parallel.pp_orders import gpipe_order as gpipe
from labkit.parallel.pp_orders import one_f_one_b_order as reference

__all__ = ["check_one_f_one_b", "check_one_f_one_b_any", "my_one_f_one_b", "reference_one_f_one_b"]

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


# ---------------------------------------------------------------------------------------------
# The same exercise for any p and m, swept against labkit.parallel.pp_orders
# ---------------------------------------------------------------------------------------------

# A typical pipeline first (its message reads best), then every p = 1..8, m = 1..12.
SWEEP = [(4, 8)] + [(p, m) for p in range(1, 9) for m in range(1, 13) if (p, m) != (4, 8)]


def my_one_f_one_b(m: int, stage: int, p: int) -> list[tuple[str, int]]:
    """The placeholder: the 1F1B order of ``("F", i)`` and ``("B", i)`` on ``stage`` of ``p``."""
    raise NotImplementedError(
        "warm-up: min(p - stage - 1, m) forwards; then one forward, one backward while forwards "
        "remain; then the remaining backwards"
    )


def _deadlock(orders: list[list[tuple[str, int]]]) -> str | None:
    """Run the stages' orders on paper; describe where they wait forever (None: they finish).

    A forward needs the previous stage's forward of the same micro-batch, a backward the next
    stage's backward of it.
    """
    p, done, at = len(orders), set(), [0] * len(orders)
    while any(at[s] < len(orders[s]) for s in range(p)):
        moved = False
        for s in range(p):
            while at[s] < len(orders[s]):
                kind, i = orders[s][at[s]]
                need = (kind, i, s - 1 if kind == "F" else s + 1)
                if 0 <= need[2] < p and need not in done:
                    break
                done.add((kind, i, s))
                at[s], moved = at[s] + 1, True
        if not moved:
            waits = [
                f"stage {s} waits to run {orders[s][at[s]]}"
                for s in range(p)
                if at[s] < len(orders[s])
            ]
            return "; ".join(waits)
    return None


def check_one_f_one_b_any(fn: Callable[[int, int, int], list[tuple[str, int]]]) -> str:
    """Check ``fn(m, stage, p)`` against 1F1B for every stage, p = 1..8, m = 1..12 (never raises)."""
    for p, m in SWEEP:
        orders = []
        for stage in range(p):
            where = f"m={m} micro-batches, stage {stage} of p={p}"
            try:
                got = [(str(kind), int(i)) for kind, i in fn(m, stage, p)]
            except Exception as err:  # noqa: BLE001 (the message is the feedback)
                return f"Not yet: your function raised {type(err).__name__}: {err} for {where}."
            forwards = [i for kind, i in got if kind == "F"]
            backwards = [i for kind, i in got if kind == "B"]
            if sorted(forwards) != list(range(m)) or sorted(backwards) != list(range(m)):
                extra = sorted({i for i in forwards + backwards if not 0 <= i < m})
                cap = (
                    f" Micro-batches {extra} do not exist: the warm-up is capped at m, "
                    "min(p - stage - 1, m)."
                    if extra
                    else ""
                )
                return (
                    f"Not yet: for {where} every micro-batch 0..{m - 1} needs exactly one 'F' and "
                    f"one 'B'; yours has forwards {forwards} and backwards {backwards}.{cap}"
                )
            early = next(
                (i for n, (kind, i) in enumerate(got) if kind == "B" and ("F", i) not in got[:n]),
                None,
            )
            if early is not None:
                return f"Not yet: the order has a backward before its forward on stage {stage} (micro-batch {early}, {where})."
            orders.append(got)
        stuck = _deadlock(orders)
        if stuck:
            return (
                f"Not yet: with p={p} stages and m={m} micro-batches the stages wait for each other "
                f"forever: {stuck}. A forward needs the previous stage's forward of its "
                "micro-batch, a backward the next stage's backward of it."
            )
        for stage, got in enumerate(orders):
            want = reference(m, stage, p)
            if got == want:
                continue
            where = f"m={m} micro-batches, stage {stage} of p={p}"
            backwards = [i for kind, i in got if kind == "B"]
            forwards = [i for kind, i in got if kind == "F"]
            if got == gpipe(m, stage, p) and m > p - stage:
                return f"That is GPipe for {where}: all forwards, then all backwards; 1F1B starts backwards as soon as it can."
            if backwards != sorted(backwards) or forwards != sorted(forwards):
                return f"Not yet: for {where} forwards and backwards each run in micro-batch order 0, 1, 2...; yours: {got}."
            if _warmup(got) != _warmup(want):
                return (
                    f"Not yet: for {where} the first backward should come after {_warmup(want)} "
                    f"forward(s): a warm-up of min(p - stage - 1, m) = {min(p - stage - 1, m)}, "
                    f"then the steady state's first forward (if any is left); yours runs {_warmup(got)}."
                )
            return f"Close: for {where} the steady state should alternate F and B. Expected {want}, got {got}."
    return (
        f"Correct! Your order is 1F1B on every stage of {len(SWEEP)} pipelines (p = 1..8, "
        "m = 1..12), m < p included: warm-up min(p - stage - 1, m), one forward one backward, "
        "then the cool-down."
    )
