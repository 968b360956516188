"""Exercise: Megatron's conjugate operators f and g, checked on 2 Gloo processes.

In a tensor-parallel MLP (Shoeybi et al. 2019) every rank holds some columns of the first
weight and the matching rows of the second: ``out = g(gelu(f(x) @ W1_r.T) @ W2_r.T)``.

* ``f`` is where the replicated input enters: the **identity** going forward, an **all-reduce
  (sum)** going backward (each rank's slice contributes a partial gradient of ``x``);
* ``g`` is where the partial outputs leave: an **all-reduce (sum)** going forward, the
  **identity** going backward (the gradient reaching ``g`` is already the same on every rank).

The learner writes the forward and backward of each, in a cell (the checker wraps them in a
``torch.autograd.Function``, handing each a fresh copy of its tensor)::

    def my_f_forward(x, group): ...
    def my_f_backward(grad, group): ...
    def my_g_forward(x, group): ...
    def my_g_backward(grad, group): ...

and runs ``print(check_f_g(my_f_forward, my_f_backward, my_g_forward, my_g_backward))``. The
checker tries f alone, g alone (rank-specific inputs and gradients, so a missing or extra sum
shows), then the whole two-layer MLP against the dense one. Reference:
``labkit.parallel.tensor_parallel.CopyToParallel`` and ``ReduceFromParallel``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist  # noqa: F401 (in the namespace of the learner's code)
import torch.nn.functional as F
from torch import Tensor

from labkit.exercises import _harness

__all__ = ["check_f_g", "my_f_backward", "my_f_forward", "my_g_backward", "my_g_forward"]

_HINT = "f: identity forward, all-reduce backward; g: all-reduce forward, identity backward"


def my_f_forward(x: Tensor, group: Any) -> Tensor:
    """The placeholder for f's forward."""
    raise NotImplementedError(_HINT)


def my_f_backward(grad: Tensor, group: Any) -> Tensor:
    """The placeholder for f's backward."""
    raise NotImplementedError(_HINT)


def my_g_forward(x: Tensor, group: Any) -> Tensor:
    """The placeholder for g's forward."""
    raise NotImplementedError(_HINT)


def my_g_backward(grad: Tensor, group: Any) -> Tensor:
    """The placeholder for g's backward."""
    raise NotImplementedError(_HINT)


def _operator(forward: Callable[..., Tensor], backward: Callable[..., Tensor], name: str) -> Any:
    """A differentiable operator from the learner's two halves."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            return _harness.call(forward, f"{name}'s forward raised", x.clone(), None)

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            return _harness.call(backward, f"{name}'s backward raised", grad.clone(), None)

    return Op.apply


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kind(got: Tensor, mine: Tensor, total: Tensor, n: int) -> str:
    """What ``got`` is: "mine" (this rank's), "sum" (over ranks), "mean", or "other"."""
    for kind, want in (("sum", total), ("mine", mine), ("mean", total / n)):
        if got.shape == want.shape and torch.allclose(got, want, atol=1e-9):
            return kind
    return "other"


def _diff(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max()) if got.shape == want.shape else float("nan")


def _worker(rank: int, n: int, *shipped: _harness.Shipped) -> str | None:
    ff, fb, gf, gb = (_harness.load(s, dict(globals())) for s in shipped)
    f, g = _operator(ff, fb, "f"), _operator(gf, gb, "g")
    message = _halves(rank, n, f, g)
    if _harness.any_rank(message is not None):  # stop together: no rank left waiting
        return message
    return _mlp(rank, n, f, g)


def _halves(rank: int, n: int, f: Any, g: Any) -> str | None:
    """f alone, then g alone, on rank-specific data: which half is wrong, and how."""
    x = _randn(0, 4, 6)  # the replicated input, the same on every rank
    mine_c, all_c = _randn(10 + rank, 4, 6), sum(_randn(10 + q, 4, 6) for q in range(n))
    xa = x.clone().requires_grad_()
    y = f(xa)
    (y * mine_c).sum().backward()
    f_fwd = "mine" if torch.allclose(y.detach(), x) else _kind(y.detach(), x, n * x, n)
    f_bwd = _kind(xa.grad, mine_c, all_c, n)
    mine_x, all_x = _randn(20 + rank, 4, 6), sum(_randn(20 + q, 4, 6) for q in range(n))
    upstream = _randn(30, 4, 6)  # the same on every rank, as after g in a real model
    xr = mine_x.clone().requires_grad_()
    z = g(xr)
    (z * upstream).sum().backward()
    g_fwd = _kind(z.detach(), mine_x, all_x, n)
    g_bwd = _kind(xr.grad, upstream, n * upstream, n)
    if (f_fwd, f_bwd, g_fwd, g_bwd) == ("sum", "mine", "mine", "sum"):
        return "Not yet: f and g are swapped: " + _HINT + "."
    if f_fwd != "mine":
        what = "sums x over the ranks" if f_fwd == "sum" else "changes x"
        return f"Not yet: f's forward {what} (rank {rank} got {_diff(y, x):.3g} off x): f is the identity going forward."
    if f_bwd != "sum":
        head = f"Not yet: x's gradient through f differs from the single-process gradient by {_diff(xa.grad, all_c):.3g}"
        if f_bwd == "mine":
            return f"{head}: it is rank {rank}'s partial only. The backward of f must all-reduce (sum) it."
        if f_bwd == "mean":
            return f"{head}: it is the mean over ranks. The partial gradients add up: sum, do not average."
        return f"{head}. The backward of f is an all-reduce (sum) of the incoming gradient."
    if g_fwd != "sum":
        head = f"Not yet: g's output differs from the sum of the ranks' partials by {_diff(z, all_x):.3g}"
        if g_fwd == "mine":
            return f"{head}: it is rank {rank}'s partial. The forward of g must all-reduce (sum)."
        if g_fwd == "mean":
            return f"{head}: it is their mean. A row-parallel layer's partials add up: sum."
        return f"{head}. The forward of g is an all-reduce (sum)."
    if g_bwd != "mine":
        head = f"Not yet: the gradient through g is off by {_diff(xr.grad, upstream):.3g}"
        if g_bwd == "sum":
            return (
                f"{head}: it is {n} times too large. The gradient reaching g is the same on every "
                "rank already; summing it counts it once per rank. g's backward is the identity."
            )
        return f"{head}. g's backward is the identity."
    return None


def _mlp(rank: int, n: int, f: Any, g: Any) -> str | None:
    """The whole tensor-parallel MLP against the dense one: outputs and all gradients."""
    x, w1, w2, c = _randn(40, 4, 6), _randn(41, 8, 6), _randn(42, 6, 8), _randn(43, 4, 6)
    dense = [t.clone().requires_grad_() for t in (x, w1, w2)]
    want_out = F.gelu(dense[0] @ dense[1].T) @ dense[2].T
    (want_out * c).sum().backward()
    cols = slice(rank * 8 // n, (rank + 1) * 8 // n)
    xp = x.clone().requires_grad_()
    w1r, w2r = w1[cols].clone().requires_grad_(), w2[:, cols].clone().requires_grad_()
    out = g(F.gelu(f(xp) @ w1r.T) @ w2r.T)
    (out * c).sum().backward()
    pairs = [
        ("the output", out, want_out),
        ("x's gradient", xp.grad, dense[0].grad),
        ("W1's gradient", w1r.grad, dense[1].grad[cols]),
        ("W2's gradient", w2r.grad, dense[2].grad[:, cols]),
    ]
    for what, got, want in pairs:
        if got is None or not torch.allclose(got, want, atol=1e-9):
            diff = float("nan") if got is None else _diff(got, want)
            return f"Not yet: in the tensor-parallel MLP {what} on rank {rank} differs from the dense model's by {diff:.3g}."
    return None


def check_f_g(
    f_forward: Any, f_backward: Any, g_forward: Any, g_backward: Any, timeout_s: float = 60.0
) -> str:
    """Check the learner's four halves of f and g on 2 Gloo processes (never raises)."""
    return _harness.verdict(
        _worker,
        (f_forward, f_backward, g_forward, g_backward),
        "Correct! f copies forward and sums the partial input gradients backward; g sums the "
        "partial outputs forward and passes the gradient through. The 2-rank MLP matches the "
        "dense one: output, input gradient and both weight shards' gradients.",
        timeout_s,
    )
