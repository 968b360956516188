"""``predict(config, cluster)``: step time, its parts, throughput, MFU and memory per GPU.

The step is modelled the way it runs (all per optimizer step, for the slowest pipeline stage):

* **compute**: the stage's FLOPs (forward, backward = 2x forward, and what recomputation runs
  again) at ``card peak x efficiency``; on this machine also a measured fixed cost per block and
  micro-batch, and the kernels' lower efficiency on narrow matrices (``Card.half_rate_width``).
* **bubble**: a pipeline's idle time, ``(p - 1)`` micro-batch times per accumulation step for
  GPipe and 1F1B, ``/ v`` interleaved, ``/ 3`` for zero-bubble schedules (Qi et al. 2023).
* **exposed communication**: each collective by the alpha-beta model (``plan.comm``). tp's
  all-reduces, pp's sends and cp's ring sit on the critical path; dp's gradient buckets overlap
  with backward on a GPU (only the part longer than backward, and the last bucket, shows), never
  on this machine, whose cores run both the compute and Gloo.
* **optimizer**: reading and writing weights, gradients and moments at memory bandwidth.

Where ranks share CPU cores (``Cluster.shared_cores``), their compute cannot beat the cores: the
step is at least all ranks' compute divided by the cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from labkit.config import TrainConfig
from labkit.parallel.presets import DP_IMPLS
from labkit.plan.comm import collective_time
from labkit.plan.hardware import Cluster
from labkit.plan.memory import Stage, memory_per_rank, stage_params, stages
from labkit.plan.workload import Workload, workload

__all__ = ["Prediction", "predict"]

_ZERO_BUBBLE = ("zb-h1", "torch-interleaved-zb", "torch-zbv")


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` returns. Times are seconds per optimizer step; memory is per GPU (the
    fullest rank), in bytes, broken down in ``memory``; ``time`` holds the step's parts."""

    workload: Workload
    cluster: Cluster
    step_time_s: float
    compute_s: float
    bubble_s: float
    exposed_comm_s: float
    optimizer_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    peak_memory_bytes: float
    memory: dict[str, float] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=dict)  # seconds per dimension (exposed)
    fits: bool = True

    @property
    def time(self) -> dict[str, float]:
        """The step's parts: compute, bubble, exposed communication and optimizer, in seconds."""
        return {
            "compute": self.compute_s,
            "bubble": self.bubble_s,
            "exposed communication": self.exposed_comm_s,
            "optimizer": self.optimizer_s,
        }

    def row(self) -> dict[str, Any]:
        """One flat row for a table of predictions."""
        return {
            "mesh": self.workload.label,
            "step_ms": 1e3 * self.step_time_s,
            **{f"{k}_ms": 1e3 * v for k, v in self.time.items()},
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "mfu": self.mfu,
            "peak_memory_GiB": self.peak_memory_bytes / 2**30,
            "fits": self.fits,
        }


def _micro_flops(w: Workload, stage: Stage) -> float:
    """FLOPs one rank of ``stage`` runs for one micro-batch, forward + backward + recompute."""
    m = w.model
    tokens = w.micro_batch_size * m.seq_len / w.cp
    block_fwd = 2 * (m.attention_matmul_params() + m.mlp_matmul_params()) + m.attention_core_flops()
    forward = stage.blocks * block_fwd + stage.head * 2 * m.d_model * m.vocab_size
    extra = m.recompute_flops_per_token(w.recompute) / m.n_layer * stage.blocks
    return tokens * (3 * forward + extra) / w.tp


def _micro_time(w: Workload, stage: Stage, cluster: Cluster) -> float:
    """Seconds of compute for one micro-batch on one rank of ``stage``."""
    card = cluster.card
    width = w.model.d_model / w.tp  # the matrices' narrow side on this rank
    rate = card.flops(w.precision) * card.efficiency * width / (width + card.half_rate_width)
    layers = stage.blocks + stage.embed + stage.head
    return _micro_flops(w, stage) / rate + card.overhead_s * layers


def _bubble(w: Workload, micro_s: float) -> float:
    """Idle seconds per optimizer step that the pipeline schedule leaves."""
    if w.pp == 1:
        return 0.0
    share = 1 / 3 if w.pp_schedule in _ZERO_BUBBLE else 1.0
    return (w.pp - 1) * micro_s * share / w.chunks_per_rank * w.grad_accum_steps


def _dp_comm(w: Workload, stage: Stage, cluster: Cluster, backward_s: float) -> float:
    """Exposed seconds of the gradient (and parameter) traffic over dp x cp, per step."""
    n = w.dp * w.cp
    if n == 1:
        return 0.0
    m = w.model
    stride = w.tp
    params = stage_params(w, stage)
    grads = 4 * params  # gradients are reduced in float32

    def ring(kind: str, nbytes: float, messages: int) -> float:
        return messages * collective_time(kind, nbytes / messages, n, cluster, stride)

    tensors = stage.blocks * m.block_tensors() + 2 * stage.embed + 2 * stage.head
    # ZeRO-3 (labkit's) gathers every module that owns parameters; FSDP2 each block and the
    # root (the embedding and head together).
    if w.dp_impl == "zero3":
        modules = stage.blocks * m.block_modules() + 2 * stage.embed + 2 * stage.head
    else:
        modules = stage.blocks + 1
    buckets = max(1, math.ceil(grads / (w.bucket_mb * 2**20)))
    impl = w.dp_impl
    if impl == "naive":
        return ring("all_reduce", grads, tensors)
    if impl in ("bucketed", "ddp", "zero1"):
        total = ring("all_reduce", grads, buckets)
        if cluster.shared_cores is None:  # a GPU overlaps buckets with backward
            total = max(total / buckets, total - backward_s)
        if impl == "zero1":  # then every rank's updated shard goes to the others
            total += ring("all_gather", 4 * params, 1)
        return total
    if impl == "zero2":
        return ring("reduce_scatter", grads, buckets) + ring("all_gather", 4 * params, 1)
    # ZeRO-3 and FSDP: gather each module's weights for forward and again for backward, and
    # reduce-scatter its gradients; FSDP prefetches the next module's while this one computes.
    per_step = w.grad_accum_steps * w.micro_batches
    gathers = 2 * per_step * ring("all_gather", 4 * params, modules)
    total = gathers + ring("reduce_scatter", grads, modules)
    if impl == "fsdp" and cluster.shared_cores is None:
        total = max(total / modules, total - per_step * 1.5 * backward_s)
    return total


def _model_comm(w: Workload, stage: Stage, cluster: Cluster) -> dict[str, float]:
    """Exposed seconds of tp's all-reduces, pp's sends and cp's ring, per optimizer step."""
    m = w.model
    micro = w.grad_accum_steps * w.micro_batches
    a = 2 if w.precision != "fp32" else 4
    activation = w.micro_batch_size * m.seq_len / w.cp * m.d_model * a
    out = {"tp": 0.0, "pp": 0.0, "cp": 0.0}
    if w.tp > 1:  # 2 all-reduces forward, 2 backward per block (one more pair per recompute)
        per_block = 4 + 2 * (w.recompute == "full")
        ar = collective_time("all_reduce", activation, w.tp, cluster, 1)
        out["tp"] = micro * stage.blocks * per_block * ar
    if w.pp > 1:  # a send forward and one backward per micro-batch, plus the fill and drain
        send = collective_time("send", activation, 2, cluster, w.dp * w.cp * w.tp)
        out["pp"] = 2 * (micro + (w.pp - 1) * w.grad_accum_steps) * send
    if w.cp > 1:  # 6 cp - 4 key/value blocks per layer and micro-batch, one send each
        send = collective_time("send", activation * m.kv_dim / m.d_model, 2, cluster, w.tp)
        out["cp"] = micro * stage.blocks * (6 * w.cp - 4) * send
    return out


def _bookkeeping(w: Workload, cluster: Cluster) -> float:
    """The step's scalar collectives: the clip norm before and after clipping (over the ranks
    that hold disjoint gradient pieces) and the loss (over dp x cp, broadcast along pp)."""
    sharded = DP_IMPLS[w.dp_impl].shards_grads
    clip_group = w.pp * w.tp * (w.dp if sharded else 1)
    seconds = 2 * collective_time("all_reduce", 8, clip_group, cluster, 1)
    seconds += collective_time("all_reduce", 4, w.dp * w.cp, cluster, w.tp)
    return seconds + collective_time("broadcast", 4, w.pp, cluster, w.dp * w.cp * w.tp)


def predict(config: TrainConfig | Mapping[str, Any] | Workload, cluster: Cluster) -> Prediction:
    """Predict one optimizer step of ``config`` (a TrainConfig or its keywords) on ``cluster``.

    Raises ValueError, naming the field, when the mesh needs more GPUs than the cluster has or
    does not divide the model or the batch.
    """
    w = workload(config)
    if w.world_size > cluster.n_gpus:
        raise ValueError(
            f"plan: the mesh {w.label} needs {w.world_size} GPUs; the cluster has {cluster.n_gpus}"
        )
    card = cluster.card
    per_step = w.grad_accum_steps * w.micro_batches
    best: tuple[float, ...] | None = None
    work_total = 0.0
    memories = []
    comms: dict[str, float] = {}
    for stage in stages(w):
        micro_s = _micro_time(w, stage, cluster)
        compute = per_step * micro_s
        work_total += compute * w.dp * w.cp * w.tp
        model = _model_comm(w, stage, cluster)
        dp = _dp_comm(w, stage, cluster, backward_s=2 / 3 * micro_s)
        scalars = _bookkeeping(w, cluster)
        mem = memory_per_rank(w, stage)
        memories.append(mem)
        touched = mem["params_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"]
        optimizer = 2 * touched / card.memory_Bps  # read everything, write weights and state
        exposed = sum(model.values()) + dp + scalars
        bubble = _bubble(w, micro_s)
        total = compute + bubble + exposed + optimizer
        if best is None or total > best[0]:
            best = (total, compute, bubble, exposed, optimizer)
            comms = {**model, "dp": dp, "scalars": scalars}
    assert best is not None
    step, compute, bubble, exposed, optimizer = best
    if cluster.shared_cores:  # processes on shared cores: the cores bound the compute
        busy = work_total / cluster.shared_cores
        if busy > compute + bubble:
            step += busy - (compute + bubble)
            compute, bubble = busy, 0.0
    tokens = w.global_batch_size * w.model.seq_len
    model_flops = tokens * w.model.train_flops_per_token()
    peak = max(memories, key=lambda m: sum(m.values()))
    peak_bytes = sum(peak.values())
    return Prediction(
        workload=w,
        cluster=cluster,
        step_time_s=step,
        compute_s=compute,
        bubble_s=bubble,
        exposed_comm_s=exposed,
        optimizer_s=optimizer,
        tokens_per_s_per_gpu=tokens / step / w.world_size,
        mfu=model_flops / step / (w.world_size * card.flops(w.precision)),
        peak_memory_bytes=peak_bytes,
        memory=dict(peak),
        comm=comms,
        fits=peak_bytes <= card.memory_bytes,
    )
