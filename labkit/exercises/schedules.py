"""Exercise: write linear warm-up + cosine decay yourself, and let the checker grade it.

Write ``fn(step, *, peak_lr, warmup_steps, total_steps) -> float`` with Hugging Face's convention:

* warm-up: ``peak_lr * step / warmup_steps`` for ``step < warmup_steps`` (0 at step 0),
* then half a cosine from ``peak_lr`` at ``step == warmup_steps`` down to 0 at ``total_steps``.

``check_warmup_cosine(fn)`` compares it with ``labkit.schedules.get_schedule("cosine", ...)`` and
returns a message: "Correct! ..." or a hint about the most likely mistake. It never raises on a
wrong answer, so a notebook cell can simply print the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from labkit.schedules import get_schedule

LRFunction = Callable[..., float]

# (peak_lr, warmup_steps, total_steps): a typical run, an odd-sized one, a short warm-up, and
# one without warm-up (the division by warmup_steps must be guarded), in that order so that
# the common mistakes are caught by the first settings.
SETTINGS: tuple[tuple[float, int, int], ...] = (
    (1e-3, 10, 100),
    (0.5, 7, 33),
    (3.0, 1, 12),
    (0.1, 0, 20),
)


def reference_warmup_cosine(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """A solution: linear warm-up from 0, then half a cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _close(a: float, b: float, peak_lr: float) -> bool:
    # Learners may order the float operations differently: compare relative to the peak.
    return abs(a - b) <= 1e-9 * peak_lr


# Typical wrong answers, each with the hint it deserves. The checker tries them in order when
# the learner's function disagrees with the reference; the first that reproduces the learner's
# numbers on every setting names the mistake.
def _cosine_part(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, shape: Callable[[float], float]
) -> float:
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * shape(progress)


def _plus_one_warmup(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return reference_warmup_cosine(
        step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps
    )


def _early_peak(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    # Warm-up over warmup_steps - 1 steps, then the reference decay.
    if step < warmup_steps:
        return peak_lr * min(1.0, step / max(1, warmup_steps - 1))
    return reference_warmup_cosine(
        step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps
    )


def _with_warmup(decay: Callable[[int, float, int, int], float]) -> LRFunction:
    def fn(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
        if step < warmup_steps:
            return peak_lr * step / warmup_steps
        return decay(step, peak_lr, warmup_steps, total_steps)

    return fn


def _unshifted(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    # The decay's clock starts at 0 instead of at the end of the warm-up.
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _shape(shape: Callable[[float], float]) -> LRFunction:
    return _with_warmup(lambda s, p, w, t: _cosine_part(s, p, w, t, shape))


_MISTAKES: tuple[tuple[LRFunction, str], ...] = (
    (
        _plus_one_warmup,
        "Off by one in the warm-up: at step 0 the LR must be 0 and it reaches peak_lr exactly at "
        "step == warmup_steps. Use step / warmup_steps, not (step + 1) / warmup_steps.",
    ),
    (
        _early_peak,
        "Off by one at the end of the warm-up: your LR reaches peak_lr at step warmup_steps - 1. "
        "Divide by warmup_steps (not warmup_steps - 1) so the peak comes at step == warmup_steps.",
    ),
    (
        _with_warmup(_unshifted),
        "The peak is never reached: your cosine starts decaying at step 0. Measure the decay from "
        "the end of the warm-up: progress = (step - warmup_steps) / (total_steps - warmup_steps).",
    ),
    (
        _shape(lambda p: 0.5 * (1.0 + math.cos(p))),
        "math.cos works in radians: cos(progress) only covers 1 radian of the wave. Use "
        "math.cos(math.pi * progress) to go from the top of the wave (1) to the bottom (-1).",
    ),
    (
        _shape(lambda p: 0.5 * (1.0 + math.cos(180 * p))),
        "You used degrees: 180 * progress in math.cos is 180 *radians*. Use math.pi * progress.",
    ),
    (
        _shape(lambda p: 0.5 * (1.0 + math.cos(2 * math.pi * p))),
        "Wrong phase of the cosine: 2 * pi * progress is a full wave, so the LR comes back up to "
        "peak_lr at the end. Half a wave, math.pi * progress, ends at 0.",
    ),
    (
        _shape(lambda p: math.cos(math.pi * p)),
        "Your LR goes negative: cos(pi * progress) runs from 1 to -1. Shift and halve it, "
        "0.5 * (1 + cos(pi * progress)), so it runs from 1 to 0.",
    ),
    (
        _shape(lambda p: math.cos(math.pi / 2 * p)),
        "Quarter wave: cos(pi/2 * progress) reaches 0 at the end but is not the half-cosine "
        "schedule. Use 0.5 * (1 + cos(pi * progress)).",
    ),
    (
        _shape(lambda p: 0.5 * (1.0 - math.cos(math.pi * p))),
        "Your decay goes the wrong way (0 up to peak_lr): use 0.5 * (1 + cos(pi * progress)).",
    ),
    (
        _with_warmup(lambda s, p, w, t: p * 0.5 * (1.0 + math.cos(math.pi * ((s - w) // (t - w))))),
        "Integer division: (step - warmup_steps) // (total_steps - warmup_steps) is 0 until the "
        "very end, so the LR never decays. Use / for the progress.",
    ),
)


def _evaluate(fn: LRFunction, peak_lr: float, warmup_steps: int, total_steps: int) -> list[float]:
    """The learner's LR at steps 0..total_steps (the last is the end of the decay)."""
    values = []
    for step in range(total_steps + 1):
        value = float(fn(step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps))
        if not math.isfinite(value):
            raise ValueError(f"returned {value} at step {step}")
        values.append(value)
    return values


def _matches(candidate: LRFunction, got: dict[tuple[float, int, int], list[float]]) -> bool:
    for (peak_lr, warmup_steps, total_steps), values in got.items():
        for step, value in enumerate(values):
            try:
                expected = candidate(step, peak_lr, warmup_steps, total_steps)
            except ZeroDivisionError:
                return False
            if not _close(value, expected, peak_lr):
                return False
    return True


def _describe(peak_lr: float, warmup_steps: int, total_steps: int) -> str:
    return f"peak_lr={peak_lr}, warmup_steps={warmup_steps}, total_steps={total_steps}"


def check_warmup_cosine(fn: LRFunction) -> str:
    """Grade ``fn(step, *, peak_lr, warmup_steps, total_steps) -> float``: a message, never raises.

    "Correct! ..." when ``fn`` matches ``get_schedule("cosine", ...)`` at every step of several
    runs (relative tolerance 1e-9 of the peak); otherwise a hint naming the likely mistake.
    """
    got: dict[tuple[float, int, int], list[float]] = {}
    for setting in SETTINGS:
        peak_lr, warmup_steps, total_steps = setting
        try:
            got[setting] = _evaluate(fn, peak_lr, warmup_steps, total_steps)
        except ZeroDivisionError:
            if warmup_steps == 0:
                return (
                    "Division by zero with warmup_steps=0: with no warm-up, step < warmup_steps "
                    "is never true; make sure you only divide by warmup_steps inside the warm-up "
                    "branch, and guard total_steps - warmup_steps with max(1, ...)."
                )
            return f"Your function divided by zero ({_describe(*setting)})."
        except Exception as err:  # a learner's bug of any kind becomes a message, not a crash
            return (
                f"Your function failed with {type(err).__name__}: {err} ({_describe(*setting)}). "
                "It must be callable as fn(step, peak_lr=..., warmup_steps=..., total_steps=...) "
                "and return a number."
            )

    mismatch = None
    for setting, values in got.items():
        peak_lr, warmup_steps, total_steps = setting
        reference = get_schedule(
            "cosine", peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps
        )
        for step, value in enumerate(values):
            if not _close(value, reference(step), peak_lr):
                mismatch = (setting, step, value, reference(step))
                break
        if mismatch:
            break
    if mismatch is None:
        return (
            "Correct! Your warm-up + cosine matches labkit's (and Hugging Face's) at every step: "
            "LR 0 at step 0, peak_lr at step == warmup_steps, 0 at total_steps."
        )

    for candidate, hint in _MISTAKES:
        if _matches(candidate, got):
            return hint
    return _generic_hint(got, mismatch)


def _generic_hint(
    got: dict[tuple[float, int, int], list[float]],
    mismatch: tuple[tuple[float, int, int], int, float, float],
) -> str:
    """A hint from the symptoms, for mistakes not in the list of typical ones."""
    for (peak_lr, warmup_steps, total_steps), values in got.items():
        where = _describe(peak_lr, warmup_steps, total_steps)
        if warmup_steps > 0 and not _close(values[0], 0.0, peak_lr):
            return (
                f"At step 0 your LR is {values[0]:g} ({where}); a linear warm-up starts at 0: "
                "lr = peak_lr * step / warmup_steps."
            )
        if max(values) < peak_lr * (1 - 1e-9):
            return (
                f"The peak is never reached: your largest LR is {max(values):g}, "
                f"expected peak_lr={peak_lr} at step {warmup_steps} ({where})."
            )
        if not _close(values[warmup_steps], peak_lr, peak_lr):
            return (
                f"Off by one at the end of the warm-up: at step == warmup_steps your LR is "
                f"{values[warmup_steps]:g}, expected exactly peak_lr={peak_lr} ({where})."
            )
        if min(values) < 0:
            return f"Your LR goes negative ({min(values):g}, {where}): an LR must stay >= 0."
        if not _close(values[-1], 0.0, peak_lr):
            return (
                f"The decay does not reach 0 at the end: at step total_steps your LR is "
                f"{values[-1]:g} ({where}). The progress must be 1 at step == total_steps: "
                "(step - warmup_steps) / (total_steps - warmup_steps)."
            )
    (peak_lr, warmup_steps, total_steps), step, value, expected = mismatch
    phase = "warm-up" if step < warmup_steps else "cosine decay"
    where = _describe(peak_lr, warmup_steps, total_steps)
    return (
        f"Not quite: during the {phase}, at step {step} ({where}) "
        f"your LR is {value:g}, expected {expected:g}."
    )
