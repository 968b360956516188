"""Learning-rate schedules and warm-ups, as pure functions of the optimizer step.

A schedule answers one question: *which learning rate does the optimizer use for its next
update?* Here that is a plain, picklable callable ``schedule(step) -> lr``:

    >>> from labkit.schedules import get_schedule
    >>> sched = get_schedule("cosine", peak_lr=1e-3, total_steps=100, warmup_steps=10)
    >>> sched(0), sched(10), sched(100)
    (0.0, 0.001, 0.0)

Conventions (the same everywhere in labkit):

* ``step`` counts **optimizer steps** from 0, not micro-batches: ``schedule(k)`` is the LR of the
  (k+1)-th update. With gradient accumulation the LR changes once per optimizer step.
* A **linear warm-up** of ``warmup_steps = w`` steps follows Hugging Face transformers: the LR at
  step 0 is 0, it rises as ``peak_lr * step / w`` and reaches ``peak_lr`` exactly at step ``w``,
  where the named schedule takes over. (So the first update is "wasted" at LR 0: that is HF's
  convention, kept so that the numbers can be cross-checked.)
* The named schedule then runs over the remaining ``total_steps - w`` steps, starting from the peak.
* The LR is **absolute**: ``as_scheduler`` sets ``param_group["lr"] = schedule(step)`` rather than
  multiplying the optimizer's initial LR by a factor, so there is no float drift and a resumed run
  continues with exactly the same numbers.

Reference implementations (the numbers match them, step for step):

==================  ============================================================================
name                reference
==================  ============================================================================
constant            transformers ``get_constant_schedule_with_warmup``
linear              transformers ``get_linear_schedule_with_warmup``
cosine              transformers ``get_cosine_schedule_with_warmup`` (``num_cycles=0.5``), or
                    ``get_cosine_with_min_lr_schedule_with_warmup`` when ``min_lr > 0``
cosine_restarts     transformers ``get_cosine_with_hard_restarts_schedule_with_warmup``
polynomial          transformers ``get_polynomial_decay_schedule_with_warmup`` (``lr_end=min_lr``)
inverse_sqrt        transformers ``get_inverse_sqrt_schedule`` (``timescale``)
wsd                 transformers ``get_wsd_schedule`` (``min_lr_ratio = min_lr / peak_lr``)
one_cycle           torch ``OneCycleLR`` (``max_lr=peak_lr``; the LR only, not the momentum cycle)
step                torch ``StepLR`` (``step_size``, ``gamma``)
exponential         torch ``ExponentialLR`` (``gamma``)
==================  ============================================================================

``min_lr`` is where a decay ends. Schedules that end at a known step (``linear``, ``cosine``,
``cosine_restarts``, ``polynomial``, ``wsd``) decay *to* ``min_lr`` (HF's rule
``factor * (1 - r) + r`` with ``r = min_lr / peak_lr``; polynomial's ``lr_end``); open-ended ones
(``inverse_sqrt``, ``step``, ``exponential``) are *floored* at ``min_lr``. ``constant`` and
``one_cycle`` reject ``min_lr > 0`` (nothing to floor; one_cycle ends at
``peak_lr / div_factor / final_div_factor``).

Warm-ups (``warmup=``), composable with every schedule:

* ``linear``: HF's ramp ``peak_lr * step / warmup_steps`` (wsd's own ramp starts at ``min_lr``).
* ``exponential``: a *geometric* ramp ``peak_lr * f ** (1 - step / warmup_steps)`` from
  ``f * peak_lr`` (``warmup_start_factor=f``, default 0.01) to ``peak_lr`` at ``warmup_steps``:
  the LR grows by the same factor every step, like an exponential in log space.
* ``untuned_linear`` / ``untuned_exponential`` (Ma & Yarats 2019, "On the adequacy of untuned
  warmup for adaptive optimization"): the warm-up length comes from Adam's ``beta2``, not from a
  tuned ``warmup_steps`` (which must stay 0). As in the paper the warm-up *multiplies* the whole
  schedule: ``lr = omega(step) * schedule(step)`` with ``omega = min(1, step / (2 / (1 - beta2)))``
  (linear, 2/(1-beta2) steps, e.g. 2000 for beta2=0.999) or
  ``omega = 1 - exp(-(1 - beta2) * step)`` (exponential, time constant 1/(1-beta2)). The paper
  counts steps from 1; here step 0 gets LR 0, like every linear warm-up in labkit.
"""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES: tuple[str, ...] = (
    "constant",
    "linear",
    "cosine",
    "cosine_restarts",
    "polynomial",
    "inverse_sqrt",
    "wsd",
    "one_cycle",
    "step",
    "exponential",
)
WARMUPS: tuple[str, ...] = ("linear", "exponential", "untuned_linear", "untuned_exponential")

# The schedule-specific keyword arguments each name accepts (their defaults are in _resolve_knobs).
_KNOBS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": (),
    "cosine": ("num_cycles",),
    "cosine_restarts": ("num_cycles",),
    "polynomial": ("power",),
    "inverse_sqrt": ("timescale",),
    "wsd": ("num_decay_steps", "num_stable_steps", "decay_type", "num_cycles"),
    "one_cycle": ("pct_start", "anneal_strategy", "div_factor", "final_div_factor", "three_phase"),
    "step": ("step_size", "gamma"),
    "exponential": ("gamma",),
}
_WARMUP_KNOBS: dict[str, tuple[str, ...]] = {"exponential": ("warmup_start_factor",)}

# Arguments people bring from HF or torch, and what they are called here.
_ALIASES = {
    "lr": "peak_lr",
    "max_lr": "peak_lr",
    "num_warmup_steps": "warmup_steps",
    "num_training_steps": "total_steps",
    "lr_end": "min_lr",
    "min_lr_ratio": "min_lr (an absolute LR, not a ratio)",
    "min_lr_rate": "min_lr (an absolute LR, not a ratio)",
}

_WSD_DECAYS = ("linear", "cosine", "1-sqrt")
_UNTUNED = ("untuned_linear", "untuned_exponential")


# --------------------------------------------------------------------------------------------
# Validation: every message names the field, the value and what is allowed.
# --------------------------------------------------------------------------------------------


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: {allowed}")


def _check_int(field: str, value: Any, *, low: int = 0) -> int:
    # bool is an int subclass in Python, but True steps is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(field, value, f"expected an integer >= {low}")
    if value < low:
        _fail(field, value, f"expected an integer >= {low}")
    return int(value)


def _check_real(field: str, value: Any, allowed: str, ok: Any) -> float:
    """Check that value is a finite real number with ok(value) true; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(field, value, allowed)
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        _fail(field, value, allowed)
    return value


def _check_choice(field: str, value: Any, choices: tuple[str, ...], kind: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    _fail(field, value, f"unknown {kind}{hint}; valid {kind}s: {', '.join(choices)}")
    return value  # unreachable, keeps type checkers calm


def _untuned_length(warmup: str, beta2: float) -> float:
    """Ma & Yarats' warm-up length in steps: 2/(1-beta2) (linear) or 1/(1-beta2) (exponential)."""
    length = (2.0 if warmup == "untuned_linear" else 1.0) / (1.0 - beta2)
    # 2/(1-0.999) is 1999.9999999999982 in floats: round the noise away so 2000 means 2000.
    return float(round(length)) if abs(length - round(length)) < 1e-9 * length else length


def _resolve(
    name: Any,
    *,
    peak_lr: Any,
    total_steps: Any,
    warmup_steps: Any,
    warmup: Any,
    min_lr: Any,
    beta2: Any,
    kw: dict[str, Any],
) -> dict[str, Any]:
    """Validate every argument and return them normalised, with each knob's default filled in."""
    name = _check_choice("name", name, SCHEDULES, "schedule")
    warmup = _check_choice("warmup", warmup, WARMUPS, "warm-up")
    peak_lr = _check_real("peak_lr", peak_lr, "expected a finite number > 0", lambda v: v > 0)
    total_steps = _check_int("total_steps", total_steps, low=1)
    warmup_steps = _check_int("warmup_steps", warmup_steps)
    if warmup_steps > total_steps:
        _fail(
            "warmup_steps",
            warmup_steps,
            f"the warm-up cannot be longer than the run; expected 0 <= warmup_steps <= "
            f"total_steps={total_steps}",
        )
    min_lr = _check_real(
        "min_lr",
        min_lr,
        f"expected a number in [0, peak_lr={peak_lr}]",
        lambda v: 0.0 <= v <= peak_lr,
    )
    if min_lr > 0 and name in ("constant", "one_cycle"):
        why = (
            "a constant LR never decays, so a floor has no effect"
            if name == "constant"
            else "one_cycle ends at peak_lr / div_factor / final_div_factor; set final_div_factor"
        )
        _fail("min_lr", min_lr, f"schedule {name!r} takes no min_lr ({why}); use min_lr=0")

    if warmup in _UNTUNED:
        if beta2 is None:
            _fail("beta2", beta2, f"warmup={warmup!r} needs Adam's beta2, a number in (0, 1)")
        beta2 = _check_real("beta2", beta2, "expected a number in (0, 1)", lambda v: 0 < v < 1)
        if warmup_steps != 0:
            _fail(
                "warmup_steps",
                warmup_steps,
                f"warmup={warmup!r} takes its length from beta2, not from warmup_steps; "
                "use warmup_steps=0",
            )
        length = _untuned_length(warmup, beta2)
        if length > total_steps:
            _fail(
                "beta2",
                beta2,
                f"with warmup={warmup!r} the warm-up lasts {length:g} steps, longer than the run "
                f"(total_steps={total_steps}); use a smaller beta2 or more steps",
            )
    else:
        beta2 = None  # only the untuned warm-ups read beta2; ignore the optimizer's value

    allowed = _KNOBS[name] + _WARMUP_KNOBS.get(warmup, ())
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        hints = [f"{k} -> use {_ALIASES[k]}" for k in unknown if k in _ALIASES]
        hint = f" ({'; '.join(hints)})" if hints else ""
        takes = ", ".join(allowed) if allowed else "no extra arguments"
        raise ValueError(
            f"unknown keyword argument(s) for schedule {name!r} with warmup={warmup!r}: "
            f"{', '.join(unknown)}{hint}; it takes: {takes}"
        )

    # The decay starts where the warm-up ends. The untuned warm-ups multiply the whole schedule
    # instead (Ma & Yarats), so for them the named schedule starts decaying at step 0.
    decay_start = 0 if warmup in _UNTUNED else warmup_steps
    knobs = _resolve_knobs(name, kw, total_steps=total_steps, decay_start=decay_start)
    if warmup == "exponential":
        knobs["warmup_start_factor"] = _check_real(
            "warmup_start_factor",
            kw.get("warmup_start_factor", 0.01),
            "expected a number in (0, 1]",
            lambda v: 0 < v <= 1,
        )
    return {
        "name": name,
        "peak_lr": peak_lr,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "warmup": warmup,
        "min_lr": min_lr,
        "beta2": beta2,
        "knobs": knobs,
    }


def _resolve_knobs(
    name: str, kw: dict[str, Any], *, total_steps: int, decay_start: int
) -> dict[str, Any]:
    """Validate the schedule-specific arguments and fill in their defaults."""
    decay_steps = total_steps - decay_start  # how long the named schedule runs after warm-up
    positive = "expected a finite number > 0"
    knobs: dict[str, Any] = {}
    if name in ("cosine", "cosine_restarts", "wsd"):
        default = 1 if name == "cosine_restarts" else 0.5
        knobs["num_cycles"] = _check_real(
            "num_cycles", kw.get("num_cycles", default), positive, lambda v: v > 0
        )
    if name == "polynomial":
        knobs["power"] = _check_real("power", kw.get("power", 1.0), positive, lambda v: v > 0)
    if name == "inverse_sqrt":
        # HF: the time scale defaults to the warm-up length, or 10_000 without warm-up.
        knobs["timescale"] = _check_int(
            "timescale", kw.get("timescale", decay_start or 10_000), low=1
        )
    if name == "wsd":
        knobs.update(_resolve_wsd(kw, decay_steps))
    if name == "one_cycle":
        knobs.update(_resolve_one_cycle(kw, decay_steps))
    if name == "step":
        knobs["step_size"] = _check_int(
            "step_size", kw.get("step_size", max(1, decay_steps // 3)), low=1
        )
        knobs["gamma"] = _check_real("gamma", kw.get("gamma", 0.1), positive, lambda v: v > 0)
    if name == "exponential":
        # Default: fall 100x over the run, whatever its length.
        default_gamma = 0.01 ** (1.0 / max(1, decay_steps))
        knobs["gamma"] = _check_real(
            "gamma", kw.get("gamma", default_gamma), positive, lambda v: v > 0
        )
    return knobs


def _resolve_wsd(kw: dict[str, Any], decay_steps: int) -> dict[str, Any]:
    """Warm-up / stable / decay lengths (HF ``get_wsd_schedule``) and the decay shape."""
    stable = kw.get("num_stable_steps")
    if "num_decay_steps" in kw:
        decay = _check_int("num_decay_steps", kw["num_decay_steps"])
    elif stable is not None:
        decay = max(0, decay_steps - _check_int("num_stable_steps", stable))
    else:
        decay = round(0.2 * decay_steps)  # default: decay over the last 20% of the steps
    if stable is None:
        if decay > decay_steps:
            _fail(
                "num_decay_steps",
                decay,
                f"the decay must fit in the {decay_steps} steps after warm-up",
            )
        stable = decay_steps - decay
    stable = _check_int("num_stable_steps", stable)
    decay_type = _check_choice("decay_type", kw.get("decay_type", "cosine"), _WSD_DECAYS, "decay")
    return {"num_decay_steps": decay, "num_stable_steps": stable, "decay_type": decay_type}


def _resolve_one_cycle(kw: dict[str, Any], decay_steps: int) -> dict[str, Any]:
    """torch ``OneCycleLR``'s arguments, checked so that every phase has a length."""
    knobs = {
        "pct_start": _check_real(
            "pct_start",
            kw.get("pct_start", 0.3),
            "expected a number in (0, 1)",
            lambda v: 0 < v < 1,
        ),
        "anneal_strategy": _check_choice(
            "anneal_strategy", kw.get("anneal_strategy", "cos"), ("cos", "linear"), "strategy"
        ),
        "div_factor": _check_real(
            "div_factor", kw.get("div_factor", 25.0), "expected a number > 0", lambda v: v > 0
        ),
        "final_div_factor": _check_real(
            "final_div_factor",
            kw.get("final_div_factor", 1e4),
            "expected a number > 0",
            lambda v: v > 0,
        ),
        "three_phase": kw.get("three_phase", False),
    }
    if not isinstance(knobs["three_phase"], bool):
        _fail("three_phase", knobs["three_phase"], "expected True or False")
    # torch divides by each phase's length; a phase of zero steps would divide by zero.
    ends = _one_cycle_phase_ends(decay_steps, knobs["pct_start"], knobs["three_phase"])
    starts = [0.0, *ends[:-1]]
    if any(end <= start for start, end in zip(starts, ends, strict=True)):
        _fail(
            "pct_start",
            knobs["pct_start"],
            f"with {decay_steps} steps after warm-up one of one_cycle's phases has no length; "
            "use a pct_start that gives each phase more than one step, or more steps",
        )
    return knobs


def validate_schedule_args(
    name: str,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup: str = "linear",
    min_lr: float = 0.0,
    beta2: float | None = None,
    **kw: Any,
) -> None:
    """Raise ``ValueError`` (naming the field, its value and what is allowed) for bad arguments.

    Takes exactly the arguments of :func:`get_schedule`, builds nothing: ``TrainConfig`` calls it
    so that a bad schedule is reported before any worker process starts.
    """
    _resolve(
        name,
        peak_lr=peak_lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup=warmup,
        min_lr=min_lr,
        beta2=beta2,
        kw=kw,
    )


# --------------------------------------------------------------------------------------------
# The schedules. Each returns the LR at `step` once the warm-up is over (step >= start, where
# `start` is the decay start). The HF ones keep HF's expressions, operation for operation, so
# that the floats are identical.
# --------------------------------------------------------------------------------------------


def _interpolate(factor: float, s: Schedule) -> float:
    """Map a decay factor in [0, 1] onto [min_lr, peak_lr] (HF's min-LR rule)."""
    ratio = s.min_lr / s.peak_lr
    return s.peak_lr * max(0.0, factor * (1 - ratio) + ratio)


def _progress(step: int, start: int, total: int) -> float:
    """Fraction of the decay done: 0 at the end of warm-up, 1 at total_steps."""
    return float(step - start) / float(max(1, total - start))


def _constant(step: int, start: int, s: Schedule) -> float:
    return s.peak_lr * 1.0


def _linear(step: int, start: int, s: Schedule) -> float:
    factor = max(0.0, float(s.total_steps - step) / float(max(1, s.total_steps - start)))
    return _interpolate(factor, s)


def _cosine(step: int, start: int, s: Schedule) -> float:
    progress = _progress(step, start, s.total_steps)
    # 0.5 * (1 + cos(pi * p)) is half a cosine wave: 1 at p=0, 0 at p=1 (num_cycles=0.5).
    factor = 0.5 * (1.0 + math.cos(math.pi * float(s.knobs["num_cycles"]) * 2.0 * progress))
    return _interpolate(factor, s)


def _cosine_restarts(step: int, start: int, s: Schedule) -> float:
    progress = _progress(step, start, s.total_steps)
    if progress >= 1.0:
        return _interpolate(0.0, s)
    # `% 1.0` restarts the half-cosine num_cycles times: a sawtooth of cosines.
    cycle = (float(s.knobs["num_cycles"]) * progress) % 1.0
    return _interpolate(max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycle))), s)


def _polynomial(step: int, start: int, s: Schedule) -> float:
    decay_steps = s.total_steps - start
    if step > s.total_steps or decay_steps == 0:
        return s.min_lr
    pct_remaining = 1 - (step - start) / decay_steps
    return (s.peak_lr - s.min_lr) * pct_remaining ** s.knobs["power"] + s.min_lr


def _inverse_sqrt(step: int, start: int, s: Schedule) -> float:
    # peak * sqrt(timescale / (step + shift)): equal to peak where the warm-up ends, then ~1/sqrt.
    timescale = s.knobs["timescale"]
    shift = timescale - start
    decay = 1.0 / math.sqrt((step + shift) / timescale)
    return max(s.min_lr, s.peak_lr * decay)


def _wsd(step: int, start: int, s: Schedule) -> float:
    stable, decay = s.knobs["num_stable_steps"], s.knobs["num_decay_steps"]
    if step < start + stable:
        return s.peak_lr * 1.0
    if step < start + stable + decay:
        progress = float(step - start - stable) / float(max(1, decay))
        kind = s.knobs["decay_type"]
        if kind == "linear":
            factor = 1.0 - progress
        elif kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(s.knobs["num_cycles"]) * 2.0 * progress))
        else:  # "1-sqrt": drops slowly at first, fast at the very end
            factor = 1.0 - math.sqrt(progress)
        return _interpolate(factor, s)
    return s.peak_lr * (s.min_lr / s.peak_lr)  # HF returns min_lr_ratio, times the peak


def _one_cycle_phase_ends(steps: int, pct_start: float, three_phase: bool) -> list[float]:
    """The last step of each OneCycleLR phase, computed exactly as torch does."""
    if three_phase:
        return [float(pct_start * steps) - 1, float(2 * pct_start * steps) - 2, steps - 1]
    return [float(pct_start * steps) - 1, steps - 1]


def _one_cycle(step: int, start: int, s: Schedule) -> float:
    k = s.knobs
    initial = s.peak_lr / k["div_factor"]  # where the cycle starts...
    final = initial / k["final_div_factor"]  # ...and where it ends
    ends = _one_cycle_phase_ends(s.total_steps - start, k["pct_start"], k["three_phase"])
    if k["three_phase"]:  # up, down to initial, then annihilate to final
        targets = [(initial, s.peak_lr), (s.peak_lr, initial), (initial, final)]
    else:  # up, then all the way down
        targets = [(initial, s.peak_lr), (s.peak_lr, final)]
    t, phase_start = step - start, 0.0
    for i, (end, (lr_from, lr_to)) in enumerate(zip(ends, targets, strict=True)):
        if t <= end or i == len(ends) - 1:
            # torch refuses to step past total_steps; here the LR simply stays at its final value.
            pct = min(1.0, (t - phase_start) / (end - phase_start))
            if k["anneal_strategy"] == "cos":
                return lr_to + (lr_from - lr_to) / 2.0 * (math.cos(math.pi * pct) + 1)
            return (lr_to - lr_from) * pct + lr_from
        phase_start = end
    raise AssertionError("unreachable: the last phase always matches")


def _step(step: int, start: int, s: Schedule) -> float:
    drops = (step - start) // s.knobs["step_size"]
    return max(s.min_lr, s.peak_lr * s.knobs["gamma"] ** drops)


def _exponential(step: int, start: int, s: Schedule) -> float:
    return max(s.min_lr, s.peak_lr * s.knobs["gamma"] ** (step - start))


_SHAPES = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_restarts": _cosine_restarts,
    "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt,
    "wsd": _wsd,
    "one_cycle": _one_cycle,
    "step": _step,
    "exponential": _exponential,
}


# --------------------------------------------------------------------------------------------
# Schedule: the callable, and its adapter to torch's LRScheduler.
# --------------------------------------------------------------------------------------------


class Schedule:
    """A learning-rate schedule: ``schedule(step) -> lr`` for optimizer step ``step`` (0-based).

    Pure (the same step always gives the same LR), picklable, comparable with ``==``. Build it
    with :func:`get_schedule`, which takes the same arguments; ``repr`` shows every resolved
    argument (defaults included), and ``eval(repr(s))`` rebuilds an equal schedule.
    """

    def __init__(
        self,
        name: str,
        *,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup: str = "linear",
        min_lr: float = 0.0,
        beta2: float | None = None,
        **kw: Any,
    ) -> None:
        args = _resolve(
            name,
            peak_lr=peak_lr,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            warmup=warmup,
            min_lr=min_lr,
            beta2=beta2,
            kw=kw,
        )
        self.name: str = args["name"]
        self.peak_lr: float = args["peak_lr"]
        self.total_steps: int = args["total_steps"]
        self.warmup_steps: int = args["warmup_steps"]
        self.warmup: str = args["warmup"]
        self.min_lr: float = args["min_lr"]
        self.beta2: float | None = args["beta2"]
        self.knobs: dict[str, Any] = args["knobs"]

    @property
    def warmup_length(self) -> float:
        """Steps until the warm-up is done: ``warmup_steps``, or Ma & Yarats' length from beta2."""
        if self.warmup in _UNTUNED:
            return _untuned_length(self.warmup, self.beta2)
        return float(self.warmup_steps)

    def __call__(self, step: int) -> float:
        """The LR for optimizer step ``step`` (0-based; steps past ``total_steps`` are allowed)."""
        step = _check_int("step", step)
        if self.warmup in _UNTUNED:
            # Ma & Yarats: the warm-up factor omega multiplies the schedule from step 0 on.
            if self.warmup == "untuned_linear":
                omega = min(1.0, step / self.warmup_length)
            else:
                omega = 1.0 - math.exp(-(1.0 - self.beta2) * step)
            return omega * _SHAPES[self.name](step, 0, self)
        if step < self.warmup_steps:
            return self._warmup_lr(step)
        return _SHAPES[self.name](step, self.warmup_steps, self)

    def _warmup_lr(self, step: int) -> float:
        """LR during a tuned warm-up (step < warmup_steps)."""
        progress = float(step) / float(max(1, self.warmup_steps))
        if self.warmup == "linear":
            factor = progress  # HF: 0 at step 0, 1 at step == warmup_steps
        else:  # geometric: the same growth factor every step, from f * peak to peak
            factor = self.knobs["warmup_start_factor"] ** (1.0 - progress)
        if self.name == "wsd":  # HF's WSD warms up from min_lr instead of from 0
            ratio = self.min_lr / self.peak_lr
            return self.peak_lr * max(0.0, factor * (1.0 - ratio) + ratio)
        return self.peak_lr * factor

    def curve(self, n: int | None = None) -> list[float]:
        """The LRs of steps ``0 .. n-1`` (default: the whole run, ``total_steps``), for plotting."""
        n = self.total_steps if n is None else _check_int("n", n)
        return [self(step) for step in range(n)]

    def as_scheduler(self, optimizer: torch.optim.Optimizer) -> ScheduleLR:
        """A torch ``LRScheduler`` (a ``ScheduleLR``) that follows this schedule."""
        return ScheduleLR(optimizer, self)

    def to_dict(self) -> dict[str, Any]:
        """Every argument, resolved, as plain values: ``get_schedule(**s.to_dict()) == s``."""
        args: dict[str, Any] = {
            "name": self.name,
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup": self.warmup,
            "min_lr": self.min_lr,
        }
        if self.beta2 is not None:
            args["beta2"] = self.beta2
        return {**args, **self.knobs}

    def __repr__(self) -> str:
        args = self.to_dict()
        rest = ", ".join(f"{key}={value!r}" for key, value in args.items() if key != "name")
        return f"Schedule({args['name']!r}, {rest})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))


def get_schedule(
    name: str,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup: str = "linear",
    min_lr: float = 0.0,
    beta2: float | None = None,
    **kw: Any,
) -> Schedule:
    """Build the schedule ``name`` (one of :data:`SCHEDULES`): a callable ``step -> lr``.

    Args:
        name: the schedule, e.g. ``"cosine"``; see the module docstring for each one's reference.
        peak_lr: the LR at the end of the warm-up (torch's ``max_lr`` for one_cycle).
        total_steps: optimizer steps in the run.
        warmup_steps: length of a ``linear`` or ``exponential`` warm-up; LR 0 at step 0 and
            ``peak_lr`` at step ``warmup_steps`` for the linear one. 0 means no warm-up.
        warmup: one of :data:`WARMUPS`.
        min_lr: where the decay ends (or its floor, for open-ended decays).
        beta2: Adam's beta2, required by the ``untuned_*`` warm-ups, ignored otherwise.
        **kw: schedule knobs: ``num_cycles`` (cosine, cosine_restarts, wsd), ``power``
            (polynomial), ``timescale`` (inverse_sqrt), ``num_decay_steps``,
            ``num_stable_steps``, ``decay_type`` (wsd), ``pct_start``, ``anneal_strategy``,
            ``div_factor``, ``final_div_factor``, ``three_phase`` (one_cycle), ``step_size``,
            ``gamma`` (step, exponential), ``warmup_start_factor`` (exponential warm-up).

    Raises:
        ValueError: naming the field, its value and what is allowed.
    """
    return Schedule(
        name,
        peak_lr=peak_lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup=warmup,
        min_lr=min_lr,
        beta2=beta2,
        **kw,
    )


class ScheduleLR(LRScheduler):
    """Sets every param group's ``lr`` to ``schedule(step)`` (absolute, not a factor).

    Like ``LambdaLR``, but the LR does not depend on the optimizer's initial LR, and the
    ``state_dict`` holds only plain values (no functions), so it survives ``torch.save`` /
    ``torch.load(weights_only=True)``. Loading a state dict restores the position in the
    schedule; the schedule itself is the one this scheduler was built with.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a labkit Schedule, got {type(schedule).__name__}")
        self.schedule = schedule  # set first: the base constructor already asks for the LR
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """The LR for every param group at the current step (``last_epoch``)."""
        lr = self.schedule(self.last_epoch)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's position, plus a plain description of the schedule for reference."""
        state = super().state_dict()
        state["schedule"] = self.schedule.to_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position: the next ``step()`` gives the next LR of that run."""
        state = dict(state_dict)
        saved = state.pop("schedule", None)
        if saved is not None and saved != self.schedule.to_dict():
            # Legitimate (e.g. branching a WSD decay off a stable-phase checkpoint), but worth
            # knowing: the LRs from here on follow the new schedule, not the saved one.
            warnings.warn(
                f"resuming with {self.schedule!r}, but the checkpoint was saved with "
                f"Schedule({saved!r})",
                stacklevel=2,
            )
        super().load_state_dict(state)
        # The LR is a pure function of the step, so set it now: the result no longer depends on
        # whether the optimizer's own state (with its saved lr) is loaded before or after.
        lr = self.schedule(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]


# --------------------------------------------------------------------------------------------
# Helpers used by the notebooks.
# --------------------------------------------------------------------------------------------


def transformer_lr(
    d_model: int, warmup_steps: int = 4000, *, total_steps: int = 100_000
) -> Schedule:
    """The rule of "Attention Is All You Need" (Vaswani et al. 2017), as an ``inverse_sqrt``.

    ``lr = d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)`` is HF's inverse_sqrt
    with ``timescale = warmup_steps`` and ``peak_lr = (d_model * warmup_steps) ** -0.5``: a linear
    warm-up to the peak, then ``peak * sqrt(warmup_steps / step)``. (The paper counts from
    step 1; at step 0 the LR is 0 here.) ``total_steps`` defaults to the paper's 100k.
    """
    d_model = _check_int("d_model", d_model, low=1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, low=1)
    return get_schedule(
        "inverse_sqrt",
        peak_lr=d_model**-0.5 * warmup_steps**-0.5,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        timescale=warmup_steps,
    )


def _positive(field: str, value: Any) -> float:
    return _check_real(field, value, "expected a finite number > 0", lambda v: v > 0)


def scale_lr_linear(base_lr: float, base_batch: int, new_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): k times the batch, k times the LR (for SGD)."""
    base_lr = _positive("base_lr", base_lr)
    return base_lr * _positive("new_batch", new_batch) / _positive("base_batch", base_batch)


def scale_lr_sqrt(base_lr: float, base_batch: int, new_batch: int) -> float:
    """Square-root scaling rule: k times the batch, sqrt(k) times the LR (usual for Adam)."""
    base_lr = _positive("base_lr", base_lr)
    ratio = _positive("new_batch", new_batch) / _positive("base_batch", base_batch)
    return base_lr * math.sqrt(ratio)


def goyal_warmup_steps(num_examples: int, batch_size: int, epochs: float = 5.0) -> int:
    """Warm-up length of Goyal et al. 2017: ``epochs`` (5) epochs' worth of optimizer steps.

    A warm-up fixed in *epochs* gets shorter in steps as the batch grows, which is why the rule
    is stated per epoch: ``ceil(epochs * num_examples / batch_size)``.
    """
    steps = _positive("epochs", epochs) * _positive("num_examples", num_examples)
    return math.ceil(steps / _positive("batch_size", batch_size))
