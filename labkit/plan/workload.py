"""What the planner is asked about: a model on a mesh, from a ``TrainConfig`` or its keywords.

For labkit's own presets the keywords go through ``TrainConfig`` itself, so a plan refuses exactly
what a run would refuse. For models this machine cannot train (``PUBLISHED`` names or a
``ModelShape``) the same keywords are checked here: the mesh must divide the model and the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from labkit.config import OPTIMIZERS, PRECISIONS, RECOMPUTE, TrainConfig
from labkit.parallel.presets import (
    CHUNKED_SCHEDULES,
    DEFAULT_DP_IMPL,
    DEFAULT_PP_SCHEDULE,
    DP_IMPLS,
    PP_SCHEDULES,
)
from labkit.plan.shapes import PUBLISHED, ModelShape, from_preset

__all__ = ["Workload", "workload"]


@dataclass(frozen=True)
class Workload:
    """A model, a global batch (sequences per optimizer step) and how the mesh runs it."""

    model: ModelShape
    global_batch_size: int
    grad_accum_steps: int = 1
    micro_batches: int = 1
    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1
    dp_impl: str = DEFAULT_DP_IMPL
    pp_schedule: str = DEFAULT_PP_SCHEDULE
    pp_virtual_stages: int = 1
    recompute: str = "none"
    precision: str = "fp32"
    optimizer: str = "adamw"
    momentum: float = 0.0
    bucket_mb: float = 25.0
    threads: int | None = None

    @property
    def world_size(self) -> int:
        """Ranks in the mesh."""
        return self.dp * self.pp * self.tp * self.cp

    @property
    def chunks_per_rank(self) -> int:
        """Pieces of the layer chain each pipeline rank holds: 2 in ZBV's V, ``pp_virtual_stages``
        for the other chunked schedules, 1 otherwise."""
        if self.pp_schedule == "torch-zbv":
            return 2
        return self.pp_virtual_stages if self.pp_schedule in CHUNKED_SCHEDULES else 1

    @property
    def micro_batch_size(self) -> float:
        """Sequences one rank runs at a time (cp splits each sequence, not the batch)."""
        return self.global_batch_size / (self.dp * self.grad_accum_steps * self.micro_batches)

    @property
    def label(self) -> str:
        """``dp8 x tp4 (fsdp)``-style name of the mesh."""
        dims = [f"{d}{getattr(self, d)}" for d in ("dp", "pp", "cp", "tp") if getattr(self, d) > 1]
        how = [self.dp_impl] if self.dp > 1 else []
        how += [self.pp_schedule] if self.pp > 1 else []
        name = " x ".join(dims) or "single"
        return f"{name} ({', '.join(how)})" if how else name


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_PASSED = {f.name for f in dataclasses.fields(Workload)} - {"model"}


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"plan: {name}={value!r} is invalid: {allowed}")


def _from_config(cfg: TrainConfig) -> Workload:
    from labkit.data import load_corpus

    vocab = cfg.vocab_size or load_corpus(cfg.corpus).vocab_size
    shape = dataclasses.replace(from_preset(cfg.model, vocab, cfg.block_size), norm=cfg.norm)
    values = {name: getattr(cfg, name) for name in _PASSED}
    values["dp_impl"] = cfg.dp_impl or DEFAULT_DP_IMPL
    values["pp_schedule"] = cfg.pp_schedule or DEFAULT_PP_SCHEDULE
    return Workload(model=shape, **values)


def _check(w: Workload) -> Workload:
    m = w.model
    for name in ("global_batch_size", "grad_accum_steps", "micro_batches", "dp", "pp", "tp", "cp"):
        if int(getattr(w, name)) < 1:
            _fail(name, getattr(w, name), "must be a positive integer")
    if w.dp_impl not in DP_IMPLS:
        _fail("dp_impl", w.dp_impl, f"allowed: {', '.join(DP_IMPLS)}")
    if w.pp_schedule not in PP_SCHEDULES:
        _fail("pp_schedule", w.pp_schedule, f"allowed: {', '.join(PP_SCHEDULES)}")
    for name, allowed in (
        ("recompute", RECOMPUTE),
        ("precision", PRECISIONS),
        ("optimizer", OPTIMIZERS),
    ):
        if getattr(w, name) not in allowed:
            _fail(name, getattr(w, name), f"allowed: {', '.join(allowed)}")
    if w.global_batch_size % (w.dp * w.grad_accum_steps * w.micro_batches):
        _fail(
            "global_batch_size",
            w.global_batch_size,
            f"must divide by dp x grad_accum_steps x micro_batches "
            f"= {w.dp * w.grad_accum_steps * w.micro_batches}",
        )
    if m.n_head % w.tp or (m.n_kv_head or m.n_head) % w.tp:
        _fail("tp", w.tp, f"must divide the {m.name}'s attention heads ({m.n_head})")
    if m.n_layer + 2 < w.pp * w.pp_virtual_stages:  # stages cut embedding, blocks and head
        _fail("pp", w.pp, f"{m.name} has {m.n_layer + 2} layers, fewer than pp x virtual stages")
    if w.cp > 1 and m.seq_len % (2 * w.cp):
        _fail("cp", w.cp, f"the sequence ({m.seq_len}) must divide into 2 x cp pieces")
    return w


def workload(config: TrainConfig | Mapping[str, Any]) -> Workload:
    """A ``Workload`` from a ``TrainConfig`` or the same keywords.

    ``model`` may be one of labkit's presets (the keywords then build a real ``TrainConfig``,
    validated as a run would be), a ``PUBLISHED`` name (``"llama-3.1-70b"``) or a ``ModelShape``;
    ``block_size`` sets the sequence length of any of them.
    """
    if isinstance(config, TrainConfig):
        return _check(_from_config(config))
    if isinstance(config, Workload):
        return _check(config)
    fields = dict(config)
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ValueError(f"plan: unknown TrainConfig field(s): {', '.join(unknown)}")
    model = fields.pop("model", "small")
    block_size = fields.pop("block_size", None)
    if isinstance(model, str) and model not in PUBLISHED:
        kwargs = {"progress": False, **fields, "model": model}
        if block_size:
            kwargs["block_size"] = block_size
        return _check(_from_config(TrainConfig(**kwargs)))
    if isinstance(model, str):
        model = PUBLISHED[model]
    if not isinstance(model, ModelShape):
        _fail("model", model, f"a labkit preset, one of {', '.join(PUBLISHED)}, or a ModelShape")
    if block_size:
        model = dataclasses.replace(model, seq_len=int(block_size))
    values = {k: v for k, v in fields.items() if k in _PASSED and v is not None}
    values.setdefault("global_batch_size", TrainConfig.global_batch_size)
    return _check(Workload(model=model, **values))
