"""The one table of parallelism names: presets, data-parallel flavours and pipeline schedules.

A run's parallelism is a mesh of ``pp x dp x cp x tp`` ranks (laid out pp outermost, then dp, then
cp, then tp innermost: see ``labkit.parallel.mesh``), plus how
each dimension is done: ``dp_impl`` for data parallelism and ``pp_schedule`` for the pipeline.
The strategy names of round 1 (``"ddp"``, ``"pp-1f1b"``, ``"tp"``...) are *presets*: a row here
says which dimension takes all the ranks and which implementation it uses. Config validation,
the strategy registry, the CLI's help and the lessons read these tables; a new name is one row.

This module imports nothing heavy (no torch), so validating a config stays instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Mesh dimensions, outermost first. tp is innermost (fastest-varying rank) so that its traffic,
# the most frequent, stays between neighbouring ranks (the same GPU board, in real systems); cp
# (context parallelism: each rank a piece of every sequence) passes key/value blocks every layer,
# so it comes next, as in torchtitan.
DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class DataParallelImpl:
    """One way of doing the dp dimension: the class that does it and what it shards."""

    name: str
    module: str
    cls: str
    shards_grads: bool  # True: each dp rank keeps only its piece of every gradient
    summary: str


@dataclass(frozen=True)
class PipelineSchedule:
    """One pipeline schedule: hand-written (an order of actions) or torch's own (a class name)."""

    name: str
    torch_class: str | None  # the torch.distributed.pipelining schedule, for torch's twins
    summary: str


@dataclass(frozen=True)
class Preset:
    """A strategy name: which mesh dimension takes every rank, and how it is done."""

    name: str
    dim: str | None  # "dp", "pp", "cp" or "tp"; None: one process ("single") or dims given ("mesh")
    dp_impl: str | None = None
    pp_schedule: str | None = None
    summary: str = ""


DP_IMPLS: dict[str, DataParallelImpl] = {
    d.name: d
    for d in (
        DataParallelImpl(
            "naive",
            "labkit.parallel.data_parallel",
            "NaiveDPStrategy",
            False,
            "one blocking all-reduce per gradient after backward",
        ),
        DataParallelImpl(
            "bucketed",
            "labkit.parallel.data_parallel",
            "BucketedDPStrategy",
            False,
            "gradient buckets all-reduced during backward (DDP by hand)",
        ),
        DataParallelImpl(
            "ddp",
            "labkit.parallel.data_parallel",
            "DDPStrategy",
            False,
            "torch DistributedDataParallel",
        ),
        DataParallelImpl(
            "zero1",
            "labkit.parallel.zero",
            "Zero1Strategy",
            False,
            "bucketed all-reduce, optimizer state sharded (ZeRO-1)",
        ),
        DataParallelImpl(
            "zero2",
            "labkit.parallel.sharded",
            "Zero2Strategy",
            True,
            "gradients reduce-scattered, optimizer state sharded (ZeRO-2 by hand)",
        ),
        DataParallelImpl(
            "zero3",
            "labkit.parallel.sharded",
            "Zero3Strategy",
            True,
            "parameters sharded too, gathered one module at a time (ZeRO-3 by hand)",
        ),
        DataParallelImpl(
            "fsdp",
            "labkit.parallel.zero",
            "FSDPStrategy",
            True,
            "torch FSDP2 fully_shard per block (ZeRO-3, torch's)",
        ),
    )
}

PP_SCHEDULES: dict[str, PipelineSchedule] = {
    s.name: s
    for s in (
        PipelineSchedule("gpipe", None, "all forwards, then all backwards"),
        PipelineSchedule("1f1b", None, "warm-up forwards, one forward one backward, cool-down"),
        PipelineSchedule(
            "interleaved-1f1b", None, "1F1B over pp_virtual_stages chunks per rank (Megatron)"
        ),
        PipelineSchedule("zb-h1", None, "1F1B with weight gradients moved into the bubble"),
        PipelineSchedule("torch-gpipe", "ScheduleGPipe", "torch.distributed.pipelining GPipe"),
        PipelineSchedule("torch-1f1b", "Schedule1F1B", "torch.distributed.pipelining 1F1B"),
        PipelineSchedule(
            "torch-interleaved-1f1b",
            "ScheduleInterleaved1F1B",
            "torch.distributed.pipelining interleaved 1F1B (pp_virtual_stages chunks)",
        ),
        PipelineSchedule(
            "torch-interleaved-zb",
            "ScheduleInterleavedZeroBubble",
            "torch.distributed.pipelining interleaved zero bubble (pp_virtual_stages chunks)",
        ),
        PipelineSchedule(
            "torch-zbv",
            "ScheduleZBVZeroBubble",
            "torch.distributed.pipelining ZBV zero bubble (2 chunks per rank in a V)",
        ),
    )
}
# The schedules that hold pp_virtual_stages > 1 chunks of layers per rank.
CHUNKED_SCHEDULES = (
    "interleaved-1f1b",
    "torch-interleaved-1f1b",
    "torch-interleaved-zb",
    "torch-zbv",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("single", None, summary="one process, the reference"),
        Preset("dp-naive", "dp", dp_impl="naive", summary=DP_IMPLS["naive"].summary),
        Preset("dp-bucketed", "dp", dp_impl="bucketed", summary=DP_IMPLS["bucketed"].summary),
        Preset("ddp", "dp", dp_impl="ddp", summary=DP_IMPLS["ddp"].summary),
        Preset("zero1", "dp", dp_impl="zero1", summary=DP_IMPLS["zero1"].summary),
        Preset("zero2", "dp", dp_impl="zero2", summary=DP_IMPLS["zero2"].summary),
        Preset("zero3", "dp", dp_impl="zero3", summary=DP_IMPLS["zero3"].summary),
        Preset("fsdp", "dp", dp_impl="fsdp", summary=DP_IMPLS["fsdp"].summary),
        Preset("pp-gpipe", "pp", pp_schedule="gpipe", summary="pipeline, GPipe schedule"),
        Preset("pp-1f1b", "pp", pp_schedule="1f1b", summary="pipeline, 1F1B schedule"),
        Preset("pp-torch", "pp", pp_schedule="torch-1f1b", summary="pipeline, torch's 1F1B"),
        Preset("tp", "tp", summary="tensor parallel (Megatron column/row split)"),
        Preset("cp", "cp", summary="context parallel: sequences split, ring attention"),
        Preset("mesh", None, summary="dp x pp x cp x tp as set by TrainConfig.dp, pp, cp and tp"),
    )
}

STRATEGIES = tuple(PRESETS)
DEFAULT_DP_IMPL = "bucketed"
DEFAULT_PP_SCHEDULE = "1f1b"


def describe() -> str:
    """The presets as lines of text (the CLI's help and the notebooks print this)."""
    width = max(len(name) for name in PRESETS)
    return "\n".join(f"{p.name:<{width}}  {p.summary}" for p in PRESETS.values())


def resolve_mesh(
    strategy: str,
    world_size: int | None,
    dims: dict[str, int | None],
) -> tuple[int, dict[str, int]]:
    """``(world_size, {"pp": .., "dp": .., "cp": .., "tp": ..})`` from a preset and the fields set.

    Dimensions set explicitly stay; the preset's dimension takes the ranks the others leave;
    any other dimension is 1. Raises ValueError naming the field when they cannot agree.
    """
    preset = PRESETS[strategy]
    given = {d: v for d, v in dims.items() if v is not None}
    fixed = 1
    for v in given.values():
        fixed *= v
    if preset.name == "single":
        if fixed > 1 or (world_size or 1) > 1:
            raise ValueError(
                "TrainConfig.strategy='single' runs one process: leave world_size, dp, pp, cp "
                "and tp at 1, or choose a parallel strategy (" + ", ".join(STRATEGIES[1:]) + ")"
            )
        return 1, dict.fromkeys(DIMS, 1)
    if preset.dim is None:  # "mesh": every dimension from its field
        out = {d: given.get(d, 1) for d in DIMS}
        if world_size is not None and world_size != fixed:
            raise ValueError(
                f"TrainConfig.world_size={world_size} is invalid: {_product(out)} = {fixed}; "
                "the product must equal world_size"
            )
        return fixed, out
    world = world_size if world_size is not None else max(fixed, 1)
    out = {d: given.get(d, 1) for d in DIMS}
    if preset.dim not in given:
        if world % fixed:
            raise ValueError(
                f"TrainConfig.world_size={world} is invalid: the dimensions set ("
                + ", ".join(f"{d}={v}" for d, v in given.items())
                + f") do not divide it, so {strategy!r} cannot take the rest as {preset.dim}"
            )
        out[preset.dim] = world // fixed
    product = math.prod(out.values())
    if product != world:
        raise ValueError(
            f"TrainConfig.world_size={world} is invalid: {_product(out)} = {product}; "
            "the product must equal world_size"
        )
    return world, out


def _product(shape: dict[str, int]) -> str:
    """``"dp*pp*tp = 2*2*1"`` (cp named only when set, so the message reads as the user's mesh)."""
    dims = [d for d in ("dp", "pp", "cp", "tp") if d != "cp" or shape["cp"] > 1]
    return "*".join(dims) + " = " + "*".join(str(shape[d]) for d in dims)
