"""Memory per rank for any mesh and dp_impl: the same accounting as ``RunResult.memory``.

Parameters, gradients and optimizer state follow from what each rank holds: its pipeline stage's
layers, 1/tp of the split matrices, and 1/dp of whatever the dp flavour shards (ZeRO-1 the
optimizer state, ZeRO-2 the gradients too, ZeRO-3 and FSDP the parameters too). Activations are
what autograd saves for backward (``ModelShape.block_activations``) times the micro-batches a
stage holds at once: GPipe all ``m``, 1F1B at most ``p - stage`` on stage ``stage``.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.parallel.presets import CHUNKED_SCHEDULES, DP_IMPLS
from labkit.plan.workload import Workload

__all__ = ["Stage", "block_params_per_rank", "memory_per_rank", "stage_params", "stages"]

# Bytes per parameter of (weights, gradients) by precision. bf16 and fp16 in labkit are autocast:
# the weights and gradients stay float32 and only the activations are half-size.
_WEIGHT_BYTES = {"fp32": 4, "bf16": 4, "fp16": 4}
_ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Stage:
    """What one pipeline rank runs: how many blocks, and whether it holds the two ends."""

    rank: int
    blocks: int
    embed: bool
    head: bool


def _split(n_items: int, n_parts: int) -> list[int]:
    base, extra = divmod(n_items, n_parts)
    return [base + (i < extra) for i in range(n_parts)]  # the first parts take the extra


def stages(w: Workload) -> list[Stage]:
    """The pp ranks' shares of ``embedding, blocks, head``, cut by layer count as labkit does."""
    p, v = w.pp, w.chunks_per_rank
    counts = _split(w.model.n_layer + 2, p * v)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    last = w.model.n_layer + 1
    out = []
    for r in range(p):
        chunks = (r, 2 * p - 1 - r) if w.pp_schedule == "torch-zbv" else range(r, p * v, p)
        layers = [i for c in chunks for i in range(starts[c], starts[c] + counts[c])]
        blocks = sum(1 for i in layers if 0 < i < last)
        out.append(Stage(r, blocks, 0 in layers, last in layers))
    return out


def _in_flight(w: Workload, stage: Stage) -> float:
    """Micro-batches whose activations a stage holds at its peak."""
    m, p = w.micro_batches, w.pp
    if p == 1:
        return 1.0
    if w.pp_schedule in ("gpipe", "torch-gpipe"):
        return float(m)
    if w.pp_schedule in CHUNKED_SCHEDULES:  # Megatron: p (1 + (p - 1) / (p v)) chunks' worth
        v = w.chunks_per_rank
        return min(float(m), p * (1 + (p - 1) / (p * v)) - stage.rank / v)
    return float(min(m, p - stage.rank))


def block_params_per_rank(w: Workload) -> float:
    """Parameters of one block on one tp rank: 1/tp of the split matrices, the rest whole."""
    split = w.model.attention_matmul_params() + w.model.mlp_matmul_params()
    return w.model.block_params() - split + split / w.tp


def stage_params(w: Workload, stage: Stage) -> float:
    """Parameters one rank of ``stage`` trains (before any dp sharding)."""
    m = w.model
    block = block_params_per_rank(w)
    return stage.blocks * block + stage.embed * m.embed_params() + stage.head * m.head_params()


def memory_per_rank(w: Workload, stage: Stage) -> dict[str, float]:
    """Bytes one rank of ``stage`` holds: params, grads, optimizer, activations, transient."""
    m = w.model
    impl = DP_IMPLS[w.dp_impl]
    dp = w.dp
    block = block_params_per_rank(w)
    params = stage_params(w, stage)
    wb = _WEIGHT_BYTES[w.precision]
    shard_params = dp if w.dp_impl in ("zero3", "fsdp") else 1
    shard_grads = dp if impl.shards_grads else 1
    shard_state = dp if w.dp_impl != "naive" and w.dp_impl not in ("bucketed", "ddp") else 1
    per_param_state = {"adamw": 8, "adam": 8, "sgd": 4 if w.momentum else 0}[w.optimizer]
    tokens = m.seq_len // w.cp
    seqs = w.micro_batch_size
    a = _ACTIVATION_BYTES[w.precision]
    kept, transient = m.block_activations(w.tp, w.recompute)
    acts = stage.blocks * seqs * tokens * kept * a
    if stage.embed:
        acts += m.embed_activation_bytes(seqs, tokens)
    if stage.head:
        acts += m.head_activation_bytes(seqs, tokens, a)
    acts *= _in_flight(w, stage)
    return {
        "params_bytes": params * wb / shard_params,
        "grads_bytes": params * wb / shard_grads,
        "optimizer_bytes": params * per_param_state / shard_state,
        "activations_bytes": acts,
        # Not in RunResult.memory: a recomputed block's tensors during its backward, and under
        # ZeRO-3/FSDP one block's gathered weights (both short-lived, both real on a GPU).
        "transient_bytes": (
            seqs * tokens * transient * a
            + (block * wb * (dp - 1) / dp if shard_params > 1 and stage.blocks else 0.0)
        ),
    }
