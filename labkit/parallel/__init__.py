"""Parallelism on one mesh: data parallel (by hand, DDP, ZeRO-1/2/3, FSDP2), pipeline and tensor.

``make_strategy`` builds this rank's share of a run from ``TrainConfig``: the mesh
(``labkit.parallel.mesh``), the pipeline stage and tensor-parallel slices it holds, and the
data-parallel flavour ``cfg.dp_impl`` (a class named in ``labkit.parallel.presets``, the one table
of names). Imports are lazy so that validating a config, or a single-process run, never imports
distributed machinery it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labkit.config import TrainConfig
    from labkit.model import GPT
    from labkit.parallel.base import DistContext, Strategy


def strategy_class(cfg: TrainConfig) -> type[Strategy]:
    """The Strategy class for this config: the data-parallel flavour's, or the base class."""
    from labkit.parallel import presets
    from labkit.parallel.base import Strategy

    if cfg.dp * cfg.cp == 1:
        return Strategy  # pipeline and tensor parallelism are handled by the base class
    # With cp > 1 the dp flavour averages gradients over dp x cp (even with dp = 1).
    impl = presets.DP_IMPLS[cfg.dp_impl]
    try:
        return getattr(importlib.import_module(impl.module), impl.cls)
    except (ImportError, AttributeError) as err:
        raise NotImplementedError(f"dp_impl {impl.name!r} is not available: {err}") from err


def make_strategy(cfg: TrainConfig, ctx: DistContext, model: GPT) -> Strategy:
    """Place ``model`` on this rank according to the config's mesh and implementations."""
    return strategy_class(cfg)(cfg, ctx, model)


def __getattr__(name: str) -> Any:
    if name in ("DistContext", "Strategy"):
        from labkit.parallel import base

        return getattr(base, name)
    raise AttributeError(f"module 'labkit.parallel' has no attribute {name!r}")


__all__ = ["DistContext", "Strategy", "make_strategy", "strategy_class"]
