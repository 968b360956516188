"""The backward pass split in two, for zero-bubble pipelines (Qi et al. 2024).

A linear layer ``y = x W^T + b`` has two gradients in backward: the input's, ``dx = dy W``, which
the previous pipeline stage is waiting for, and the weights', ``dW = dy^T x`` and ``db = sum dy``,
which nobody needs until the optimizer step. A zero-bubble schedule runs the first as ``B`` and
delays the second to a ``W`` pass that fills time the stage would otherwise spend idle.

``split_linear_layers(module, stash)`` makes every ``nn.Linear`` of the module compute only
``dx`` in backward and leave ``(layer, x, dy)`` in the ``WeightGradStash``; ``stash.run(key)``
is the W pass of one micro-batch: it adds ``dW`` and ``db`` to the parameters' ``.grad``. The
linear layers hold nearly all the weights and half the backward's work (one of its two matrix
products per layer); layer norms and embeddings, a few thousand parameters, keep their gradients
in B. The price of the split is memory: ``x`` and ``dy`` of every layer stay alive from a
micro-batch's B until its W (a memory meter passed as ``keep`` counts them as activations).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labkit.memory import SavedTensorMeter

__all__ = ["WeightGradStash", "split_linear_layers"]


class WeightGradStash:
    """What each micro-batch's B pass leaves for its W pass: ``(layer, x, dy)`` per linear layer."""

    def __init__(self, keep: Callable[[torch.Tensor], Any] | None = None) -> None:
        # ``keep`` wraps each kept tensor so that a memory meter counts it while it waits
        # (``SavedTensorMeter.keep``); ``unwrap`` undoes it.
        self._keep = keep or (lambda t: t)
        self._open: list[tuple[nn.Linear, Any, Any]] | None = None
        self._pending: dict[Any, list[tuple[nn.Linear, Any, Any]]] = {}

    def begin(self, key: Any) -> None:
        """A B pass for ``key`` starts: what the linear layers' backwards leave goes to it."""
        self._open = self._pending.setdefault(key, [])

    def end(self) -> None:
        """The B pass is over."""
        self._open = None

    def add(self, layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Called from a split layer's backward."""
        if self._open is None:
            raise RuntimeError("a split linear layer ran backward outside a B pass (stash.begin)")
        self._open.append((layer, self._keep(x), self._keep(grad)))

    @torch.no_grad()
    def run(self, key: Any) -> None:
        """The W pass of ``key``: accumulate every weight and bias gradient its B left behind."""
        for layer, x_kept, grad_kept in self._pending.pop(key, []):
            x, grad = SavedTensorMeter.unwrap(x_kept), SavedTensorMeter.unwrap(grad_kept)
            dy = grad.reshape(-1, grad.shape[-1])
            if layer.weight.requires_grad:
                _accumulate(layer.weight, dy.t() @ x.reshape(-1, x.shape[-1]))
            if layer.bias is not None and layer.bias.requires_grad:
                _accumulate(layer.bias, dy.sum(0))

    def __len__(self) -> int:
        return len(self._pending)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _InputGradOnly(torch.autograd.Function):
    """``F.linear`` whose backward returns the input's gradient and stashes the weights'."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: nn.Linear,
        stash: WeightGradStash,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.stash = layer, stash
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        ctx.stash.add(ctx.layer, x.detach(), grad.detach())
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


def _split_forward(layer: nn.Linear, stash: WeightGradStash, x: torch.Tensor) -> torch.Tensor:
    return _InputGradOnly.apply(x, layer.weight, layer.bias, layer, stash)


def split_linear_layers(module: nn.Module, stash: WeightGradStash) -> int:
    """Make every ``nn.Linear`` in ``module`` defer its weight gradients to ``stash``; returns
    how many layers were split. The change is to the instances (their ``forward``), in place."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.forward = partial(_split_forward, layer, stash)  # type: ignore[method-assign]
            count += 1
    return count
