"""Exercise: clip a list of gradients by their global 2-norm, then check it.

The learner writes::

    def my_clip(grads: list[torch.Tensor], max_norm: float) -> float:
        ...  # clip the tensors *in place* by their global 2-norm, return the norm before

and runs ``print(check_global_norm_clip(my_clip))``. The checker compares the function with
``torch.nn.utils.clip_grad_norm_`` on a few cases and explains the first thing that is off.
It never raises on a wrong answer: the message is the feedback.

``reference_global_norm_clip`` below is the solution (for facilitators).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["check_global_norm_clip", "reference_global_norm_clip"]

LearnerFn = Callable[[list[Tensor], float], object]

# Loose enough for a solution that leaves out torch's +1e-6 or works in float64, tight enough
# to catch every real mistake (they are off by far more than 0.01 %).
_RTOL = 1e-4
_ATOL = 1e-6


@torch.no_grad()
def reference_global_norm_clip(grads: list[Tensor], max_norm: float) -> float:
    """The solution: scale all gradients by one common factor so their global 2-norm <= max_norm.

    The global norm treats all tensors as one long vector: the square root of the sum of the
    squares of *every* element, i.e. sqrt(sum of the squared per-tensor norms).
    """
    total_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    coef = max_norm / (total_norm + 1e-6)  # +1e-6: no division by zero for all-zero grads
    if coef < 1.0:  # only ever scale *down*
        for g in grads:
            g.mul_(coef)  # in place: the optimizer reads these very tensors
    return total_norm


@dataclass
class _Case:
    """One test case: a name for the messages, the gradients and the threshold."""

    name: str
    grads: list[Tensor]
    max_norm: float


def _cases() -> list[_Case]:
    """Deterministic cases, each aimed at one classic mistake."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    # Per-tensor norms 3 and 4: the global norm is exactly 5 (a 3-4-5 triangle).
    g1, g2 = randn(3, 4), randn(6)
    three_four = [g1 * (3.0 / g1.norm()), g2 * (4.0 / g2.norm())]
    small = [randn(4, 4) * 0.01, randn(4) * 0.01]
    huge = [randn(8) * 0.1, randn(16, 16) * 1e4, randn(3) * 0.1]
    return [
        _Case("two tensors with norms 3 and 4 (global norm 5), max_norm=1", three_four, 1.0),
        _Case("small gradients that need no clipping, max_norm=1", small, 1.0),
        _Case("one huge tensor among small ones, max_norm=0.5", huge, 0.5),
    ]


def _torch_answer(case: _Case) -> tuple[float, list[Tensor]]:
    """What torch.nn.utils.clip_grad_norm_ returns and leaves in the gradients."""
    params = [torch.zeros_like(g, requires_grad=True) for g in case.grads]
    for p, g in zip(params, case.grads, strict=True):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, case.max_norm, norm_type=2.0)
    return float(norm), [p.grad for p in params]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_RTOL, abs_tol=_ATOL)


def _all_close(xs: list[Tensor], ys: list[Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=_RTOL, atol=_ATOL) for x, y in zip(xs, ys, strict=True))


def _norm_hint(returned: float, case: _Case, originals: list[Tensor], expected: float) -> str:
    """Explain a wrong returned norm by recognising the usual slips."""
    per_tensor = [float(g.norm()) for g in originals]
    head = (
        f"On the case '{case.name}': your returned norm {returned:.4g} differs from the "
        f"global norm {expected:.4g}"
    )
    if _close(returned, sum(per_tensor)):
        return (
            f"{head}: you added up the per-tensor norms. The global norm is "
            "sqrt(sum of the *squared* per-tensor norms)."
        )
    if _close(returned, expected**2):
        return f"{head}: did you forget the square root at the end?"
    if any(_close(returned, n) for n in per_tensor):
        return (
            f"{head}: did you take the norm of each tensor separately? Combine all tensors "
            "into one norm: sqrt(sum of the squared per-tensor norms)."
        )
    if expected > case.max_norm and _close(returned, case.max_norm):
        return f"{head}: you returned the norm after clipping; return the norm from before."
    return f"{head}."


def check_global_norm_clip(fn: LearnerFn) -> str:
    """Grade ``fn(grads, max_norm) -> float`` against torch; return a print-friendly message."""
    for case in _cases():
        expected_norm, expected_grads = _torch_answer(case)
        originals = [g.clone() for g in case.grads]
        grads = list(case.grads)  # the learner may mutate the list; we keep the tensors
        try:
            returned = fn(grads, case.max_norm)
        except Exception as exc:  # the learner's bug is the feedback, not a crash
            where = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return f"On the case '{case.name}' your function raised {where}"

        try:
            returned_norm = float(returned)  # a float or a 0-d tensor are both fine
        except (TypeError, ValueError, RuntimeError):
            return (
                f"On the case '{case.name}' your function returned {returned!r}: "
                "return the global norm before clipping, as a float."
            )
        if not _close(returned_norm, expected_norm):
            return _norm_hint(returned_norm, case, originals, expected_norm)

        needs_clip = expected_norm > case.max_norm
        unchanged = all(torch.equal(g, o) for g, o in zip(case.grads, originals, strict=True))
        replaced = len(grads) != len(case.grads) or any(
            new is not old for new, old in zip(grads, case.grads, strict=False)
        )
        if needs_clip and unchanged and replaced:
            return (
                f"On the case '{case.name}' the gradients were not modified in place: you put "
                "new tensors into the list, but the optimizer reads the original ones. "
                "Scale each tensor with g.mul_(coef) instead of grads[i] = g * coef."
            )
        if needs_clip and unchanged:
            return (
                f"On the case '{case.name}' the gradients were not modified in place: "
                "the optimizer reads the very same tensors, so scale them with g.mul_(coef) "
                "rather than building new ones (g = g * coef)."
            )
        if not needs_clip and not _all_close(case.grads, originals):
            return (
                f"On the case '{case.name}' you clipped when the norm was below max_norm "
                f"(norm {expected_norm:.4g} <= max_norm {case.max_norm}): clip only to scale "
                "down, i.e. use min(max_norm / norm, 1)."
            )
        if not _all_close(case.grads, expected_grads):
            return _grads_hint(case, originals, expected_norm)
    return (
        "Correct! Your function clips by the global 2-norm in place and returns the norm from "
        "before clipping, exactly like torch.nn.utils.clip_grad_norm_."
    )


def _grads_hint(case: _Case, originals: list[Tensor], expected_norm: float) -> str:
    """Explain clipped gradients that differ from torch's."""
    per_tensor_clipped = [o * min(case.max_norm / (float(o.norm()) + 1e-6), 1.0) for o in originals]
    head = f"On the case '{case.name}' the clipped gradients differ from torch's"
    if _all_close(case.grads, per_tensor_clipped):
        return (
            f"{head}: you clipped each tensor by its own norm. Use one factor for all "
            "tensors, max_norm / global_norm, so the direction of the update is kept."
        )
    new_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in case.grads))
    return (
        f"{head}: after your clipping the global norm is {new_norm:.4g}, but it should be "
        f"{min(expected_norm, case.max_norm):.4g} (scale every tensor by "
        "max_norm / global_norm)."
    )
