"""Parallel strategies: data parallel, ZeRO/FSDP sharding, pipeline and tensor parallel.

``make_strategy`` maps a ``TrainConfig.strategy`` name to its class, importing lazily so that a
single-process run never imports the distributed machinery it does not use.
"""

from __future__ import annotations

import importlib

from labkit.config import TrainConfig
from labkit.model import GPT
from labkit.parallel.base import DistContext, Strategy

# strategy name -> (module, class name)
REGISTRY: dict[str, tuple[str, str]] = {
    "single": ("labkit.parallel.base", "Strategy"),
    "dp-naive": ("labkit.parallel.data_parallel", "NaiveDPStrategy"),
    "dp-bucketed": ("labkit.parallel.data_parallel", "BucketedDPStrategy"),
    "ddp": ("labkit.parallel.data_parallel", "DDPStrategy"),
    "zero1": ("labkit.parallel.zero", "Zero1Strategy"),
    "fsdp": ("labkit.parallel.zero", "FSDPStrategy"),
    "pp-gpipe": ("labkit.parallel.pipeline", "GPipeStrategy"),
    "pp-1f1b": ("labkit.parallel.pipeline", "OneFOneBStrategy"),
    "pp-torch": ("labkit.parallel.pipeline", "TorchPipelineStrategy"),
    "tp": ("labkit.parallel.tensor_parallel", "TensorParallelStrategy"),
}


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy subclass implementing ``name``."""
    module_name, class_name = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as err:
        raise NotImplementedError(f"strategy {name!r} is not available: {err}") from err


def make_strategy(cfg: TrainConfig, ctx: DistContext, model: GPT) -> Strategy:
    """Place ``model`` according to ``cfg.strategy`` on this rank."""
    return strategy_class(cfg.strategy)(cfg, ctx, model)


__all__ = ["REGISTRY", "DistContext", "Strategy", "make_strategy", "strategy_class"]
