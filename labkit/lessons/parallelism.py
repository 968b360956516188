"""Helpers for notebook 05: tensor parallelism, and choosing between the kinds of parallelism.

The parallel layers and strategies themselves live in ``labkit.parallel``; what lives here is
the set-up of each demonstration and its bookkeeping, so the notebook cells stay short:

1. ``tp_layer_check``: one call starts N processes that run a column-parallel then a
   row-parallel linear layer (Megatron's MLP) forward and backward; the parent compares every
   rank's output and gradients with the dense layers computed in one process, and lists the
   all-reduces each rank performed.
2. ``tp_breakdown``: where a ``tp`` run's step time and bytes go, per rank and step, next to
   ``tp_comm_formula``.
3. Formulas for any preset and world size: ``parameters_per_rank`` (how many parameters each rank
   holds under each strategy), ``memory_formula`` (bytes of parameters, gradients and optimizer
   state) and ``comm_formula`` (bytes each rank sends per optimizer step); ``plan`` joins them,
   ``feasibility`` says which strategies cannot split a model over that many ranks, and
   ``busiest_rank`` / ``plan_summary`` pick the rank of each strategy that must fit.
4. ``measure_strategies``: DP, ZeRO-1, FSDP, PP and TP trained for a few steps in the *same* two
   worker processes (start-up is paid once), measuring what each rank holds and sends;
   ``measured_vs_formula`` puts the measurements next to ``plan``.

Conventions of the formulas: fp32 values (4 bytes), Adam's two moments per parameter (8 bytes),
ring collectives. A ring all-reduce of S bytes over N ranks makes every rank send
``2 (N-1)/N * S``; an all-gather or reduce-scatter of S bytes ``(N-1)/N * S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from labkit.config import TrainConfig
from labkit.model import GPT, count_params, model_config
from labkit.result import RunResult

__all__ = [
    "PRECISIONS",
    "STRATEGIES",
    "STRATEGY_LABELS",
    "LayerCheck",
    "busiest_rank",
    "comm_formula",
    "feasibility",
    "measure_strategies",
    "measured_vs_formula",
    "memory_formula",
    "parameters_per_rank",
    "plan",
    "plan_summary",
    "tp_breakdown",
    "tp_comm_formula",
    "tp_layer_check",
]

# The five ways of splitting the work that the decision part compares, in the order shown.
STRATEGIES = ("ddp", "zero1", "fsdp", "pp-gpipe", "tp")
STRATEGY_LABELS = {
    "ddp": "DP",
    "zero1": "ZeRO-1",
    "fsdp": "FSDP",  # ZeRO stage 3
    "pp-gpipe": "PP",
    "tp": "TP",
}
# Bytes per parameter for (parameters, gradients, optimizer state) with Adam.
# "mixed": bf16/fp16 weights and gradients, fp32 master weights and two fp32 moments (ZeRO paper).
PRECISIONS = {"fp32": (4, 4, 8), "mixed": (2, 2, 12)}

# Which linear layers of a block tensor parallelism splits, and how (labkit.parallel.
# tensor_parallel: ParallelAttention and ParallelMLP). Column-parallel layers split their weight
# and bias by output rows; row-parallel ones split the weight by input columns and replicate
# the bias (it is added once, after the sum).
TP_COLUMN = ("attn.q", "attn.k", "attn.v", "mlp.fc")
TP_ROW = ("attn.proj", "mlp.proj")


# ---------------------------------------------------------------------------------------------
# 1. Column- then row-parallel, on N processes, against the dense layers
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerCheck:
    """What ``tp_layer_check`` found.

    ``checks``: a sentence per comparison with the dense layers, True when it held on every rank.
    ``events``: one row per all-reduce a rank performed: ``rank``, ``pass`` (forward/backward),
    ``operator`` (``g`` after the row-parallel layer, ``f`` before the column-parallel one),
    ``shape`` and ``bytes``.
    """

    world_size: int
    checks: dict[str, bool]
    events: pd.DataFrame

    def describe_all_reduces(self) -> list[str]:
        """One line per rank: how many all-reduces it did in each pass, of which shape."""
        lines = []
        for rank, rows in self.events.groupby("rank"):
            parts = [
                f"{p}: {len(r)} all-reduce ({r['operator'].iloc[0]}) of {r['shape'].iloc[0]}"
                for p, r in rows.groupby("pass", sort=False)
            ]
            lines.append(f"rank {rank}: " + "; ".join(parts))
        return lines


def _dense_mlp(d_model: int, seed: int) -> tuple[nn.Linear, nn.Linear]:
    """fc (d -> 4d) and proj (4d -> d) with random non-zero biases, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    fc, proj = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
    with torch.no_grad():
        for p in (*fc.parameters(), *proj.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return fc, proj


def _layer_inputs(d_model: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An input ``[batch 2, tokens 3, d_model]`` and the upstream gradient of the output."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(2, 3, d_model, generator=g), torch.randn(2, 3, d_model, generator=g)


def _layer_worker(rank: int, world_size: int, d_model: int, seed: int) -> dict[str, Any]:
    """One rank: its slices of fc and proj, forward and backward, recording every all-reduce."""
    from labkit.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    fc, proj = _dense_mlp(d_model, seed)
    x, grad_y = _layer_inputs(d_model, seed)
    events: list[dict[str, Any]] = []
    current = {"pass": "forward"}

    def record(tensor: torch.Tensor, start: float, end: float) -> None:
        # In forward only g (after the row-parallel layer) all-reduces; in backward only f.
        operator = "g" if current["pass"] == "forward" else "f"
        events.append(
            {
                "rank": rank,
                "pass": current["pass"],
                "operator": operator,
                "shape": list(tensor.shape),
                "bytes": tensor.numel() * tensor.element_size(),
            }
        )

    col = ColumnParallelLinear(fc, on_comm=record)  # rows of fc.weight = its output features
    row = RowParallelLinear(proj, on_comm=record)  # columns of proj.weight = its input features
    x = x.requires_grad_()
    y = row(F.gelu(col(x)))  # GELU is element-wise: each rank applies it to its own slice
    current["pass"] = "backward"
    y.backward(grad_y)
    return {
        "y": y.detach(),
        "x.grad": x.grad,
        "fc.weight": col.weight.detach(),
        "proj.weight": row.weight.detach(),
        "fc.weight.grad": col.weight.grad,
        "fc.bias.grad": col.bias.grad,
        "proj.weight.grad": row.weight.grad,
        "proj.bias.grad": row.bias.grad,
        "events": events,
    }


def tp_layer_check(
    world_size: int = 2, d_model: int = 8, seed: int = 0, *, timeout_s: float = 60.0
) -> LayerCheck:
    """Column-parallel fc, GELU, row-parallel proj on ``world_size`` processes vs the dense MLP.

    Every rank gets the same input and upstream gradient. The parent computes the dense
    ``proj(gelu(fc(x)))`` and its gradients here, then checks that every rank's output and input
    gradient equal the dense ones, that the ranks' weight shards put together are the dense
    weights, and that their gradient shards put together are the dense gradients.
    """
    from labkit.launch import spawn

    per_rank = spawn(_layer_worker, world_size, (d_model, seed), timeout_s=timeout_s, threads=1)
    fc, proj = _dense_mlp(d_model, seed)
    x, grad_y = _layer_inputs(d_model, seed)
    x = x.requires_grad_()
    y = proj(F.gelu(fc(x)))
    y.backward(grad_y)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    def joined(key: str, dim: int) -> torch.Tensor:
        return torch.cat([r[key] for r in per_rank], dim=dim)

    checks = {
        "the weight shards put together are the dense weights": close(
            joined("fc.weight", 0), fc.weight
        )
        and close(joined("proj.weight", 1), proj.weight),
        "forward: every rank's output equals the dense MLP's": all(
            close(r["y"], y) for r in per_rank
        ),
        "backward: every rank's input gradient equals the dense one": all(
            close(r["x.grad"], x.grad) for r in per_rank
        ),
        "backward: the gradient shards put together are the dense gradients": close(
            joined("fc.weight.grad", 0), fc.weight.grad
        )
        and close(joined("fc.bias.grad", 0), fc.bias.grad)
        and close(joined("proj.weight.grad", 1), proj.weight.grad)
        and all(close(r["proj.bias.grad"], proj.bias.grad) for r in per_rank),
    }
    events = pd.DataFrame([e for r in per_rank for e in r["events"]])
    return LayerCheck(world_size, checks, events)


# ---------------------------------------------------------------------------------------------
# 2. A tp run: where the step time and the bytes go
# ---------------------------------------------------------------------------------------------


def _gpt_config(model: str, vocab_size: int | None) -> Any:
    """The preset's shape with the corpus vocabulary (loaded once per process if not given)."""
    if vocab_size is None:
        from labkit.data import load_corpus

        vocab_size = load_corpus("pydoc").vocab_size
    return model_config(model, vocab_size=vocab_size)


def _meta_gpt(model: str, vocab_size: int | None) -> GPT:
    """The GPT's structure without its memory: parameters on the "meta" device (shapes only)."""
    cfg = _gpt_config(model, vocab_size)  # outside the meta context: it may load the corpus
    with torch.device("meta"):
        return GPT(cfg)


def _tp_sharded(name: str) -> bool:
    """Whether tensor parallelism splits this parameter across the ranks (else: replicated)."""
    parts = name.split(".")  # blocks.3.attn.q.weight
    if parts[0] != "blocks" or len(parts) != 5:
        return False
    layer, kind = ".".join(parts[2:4]), parts[4]
    return layer in TP_COLUMN or (layer in TP_ROW and kind == "weight")


def tp_comm_formula(
    model: str,
    world_size: int,
    global_batch_size: int,
    *,
    clip: bool = True,
    vocab_size: int | None = None,
) -> list[int]:
    """Bytes each rank sends per optimizer step under ``tp``, by formula (one entry per rank).

    ``clip`` is accepted for compatibility and changes nothing (see below).

    Per block, forward: ``g`` after the attention and after the MLP all-reduces an activation
    ``[B, T, d]``; backward: ``f`` before them all-reduces its gradient, same size. That is 4 ring
    all-reduces per block, each sending ``2 (N-1)/N * B T d * 4`` bytes. Clipping adds one scalar
    all-reduce (the norm), not counted: the replicated parameters' gradients are identical on
    every rank and every rank clips them by the same norm, so they need no broadcast.
    """
    cfg = _gpt_config(model, vocab_size)
    activation = global_batch_size * cfg.block_size * cfg.d_model * 4
    ring = 2 * (world_size - 1) / world_size
    per_rank = int(4 * cfg.n_layer * ring * activation)
    return [per_rank] * world_size


def tp_breakdown(result: RunResult, skip: int = 1) -> pd.DataFrame:
    """Per (rank, step) of a ``tp`` run: milliseconds of compute, all-reduce and the rest, bytes.

    ``compute_ms`` is forward, backward and optimizer time without the all-reduces that block
    inside them (``comm_ms``); ``other_ms`` is the rest of the step (batch, clipping, metrics).
    ``formula_bytes`` is ``tp_comm_formula`` for the run's config. Steps before ``skip`` (warm-up)
    are left out.
    """
    cfg = result.config
    formula = tp_comm_formula(
        cfg.model, cfg.world_size, cfg.global_batch_size, clip=cfg.clip != "none"
    )
    m = result.metrics[result.metrics["step"] >= skip]
    table = pd.DataFrame(
        {
            "rank": m["rank"].to_numpy(),
            "step": m["step"].to_numpy(),
            "compute_ms": m["compute_s"].to_numpy() * 1e3,
            "comm_ms": m["comm_s"].to_numpy() * 1e3,
            "other_ms": (m["step_time_s"] - m["compute_s"] - m["comm_s"]).clip(lower=0).to_numpy()
            * 1e3,
            "comm_bytes": m["comm_bytes"].to_numpy(),
        }
    )
    table["formula_bytes"] = table["rank"].map(lambda r: formula[int(r)])
    return table.sort_values(["rank", "step"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# 3. Formulas: what each rank holds and sends, for any preset and world size
# ---------------------------------------------------------------------------------------------


def feasibility(model: str, world_size: int) -> dict[str, str]:
    """Why a strategy cannot split ``model`` over ``world_size`` ranks (strategy -> reason).

    The reasons are TrainConfig's own validation errors (the rules live in one place).
    """
    reasons = {}
    for name in STRATEGIES:
        extra = {"micro_batches": world_size} if name.startswith("pp-") else {}
        try:
            TrainConfig(
                model=model,
                strategy=name,
                world_size=world_size,
                global_batch_size=4 * world_size,
                **extra,
            )
        except ValueError as err:
            reasons[name] = f"{STRATEGY_LABELS[name]}: {str(err).removeprefix('TrainConfig.')}"
    return reasons


def parameters_per_rank(
    model: str, world_size: int, *, vocab_size: int | None = None
) -> pd.DataFrame:
    """How many parameters, gradients and optimizer-state entries each rank holds.

    One row per (strategy, rank): ``params``, ``grads``, ``optimizer`` (in parameters: Adam keeps
    two moments of each, which the byte counts account for). Strategies that cannot split this
    model over ``world_size`` ranks (``feasibility``) are left out.

    * DP: everything on every rank. ZeRO-1: the optimizer state split N ways.
      FSDP (ZeRO-3): parameters, gradients and optimizer state split N ways.
    * PP: each stage holds its layers (cut by layer count, as ``pp_balance="layers"``).
    * TP: each rank holds 1/N of the attention and MLP matrices, and a full copy of the rest
      (embeddings, layer norms, head, row-parallel biases).
    """
    from labkit.parallel.pipeline import stage_bounds

    gpt = _meta_gpt(model, vocab_size)
    psi, n = count_params(gpt), world_size
    blocked = feasibility(model, n)
    rows: list[dict[str, Any]] = []

    def add(strategy: str, rank: int, params: float, grads: float, optimizer: float) -> None:
        rows.append(
            {
                "strategy": strategy,
                "rank": rank,
                "params": params,
                "grads": grads,
                "optimizer": optimizer,
            }
        )

    for r in range(n):
        add("ddp", r, psi, psi, psi)
        add("zero1", r, psi, psi, psi / n)
        add("fsdp", r, psi / n, psi / n, psi / n)
    if "pp-gpipe" not in blocked:
        layers = gpt.layers()
        for r, (start, stop) in enumerate(stage_bounds(gpt, n)):
            stage = sum(count_params(layer) for layer in layers[start:stop])
            add("pp-gpipe", r, stage, stage, stage)
    if "tp" not in blocked:
        named = list(gpt.named_parameters())
        sharded = sum(p.numel() for name, p in named if _tp_sharded(name))
        held = psi - sharded + sharded / n
        for r in range(n):
            add("tp", r, held, held, held)
    frame = pd.DataFrame(rows)
    frame["_order"] = frame["strategy"].map(STRATEGIES.index)
    frame = frame.sort_values(["_order", "rank"], kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True)


def memory_formula(
    model: str, world_size: int, precision: str = "fp32", *, vocab_size: int | None = None
) -> pd.DataFrame:
    """Bytes per rank for parameters, gradients and Adam's state, by formula.

    ``precision``: "fp32" (4 + 4 + 8 bytes per parameter, what labkit trains with) or "mixed"
    (2 + 2 + 12: half-precision weights and gradients, fp32 master weights and moments, as in the
    ZeRO paper). One row per (strategy, rank) with ``params_bytes``, ``grads_bytes``,
    ``optimizer_bytes``, ``total_bytes``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: allowed: {', '.join(PRECISIONS)}")
    bp, bg, bo = PRECISIONS[precision]
    counts = parameters_per_rank(model, world_size, vocab_size=vocab_size)
    frame = counts[["strategy", "rank"]].copy()
    frame["params_bytes"] = counts["params"] * bp
    frame["grads_bytes"] = counts["grads"] * bg
    frame["optimizer_bytes"] = counts["optimizer"] * bo
    frame["total_bytes"] = frame[["params_bytes", "grads_bytes", "optimizer_bytes"]].sum(axis=1)
    return frame


def comm_formula(
    model: str,
    world_size: int,
    global_batch_size: int = 16,
    *,
    clip: bool = True,
    vocab_size: int | None = None,
) -> pd.DataFrame:
    """Bytes each rank sends per optimizer step, by formula, as labkit's strategies communicate.

    With Psi parameters of 4 bytes, N ranks, activations ``A = B T d * 4`` bytes:

    * DP: one all-reduce of the gradients: ``2 (N-1)/N * 4 Psi``.
    * ZeRO-1 (labkit's): the same all-reduce, then each rank broadcasts its updated shard to the
      others: ``+ (N-1)/N * 4 Psi``. (The paper's version reduce-scatters instead of all-reducing
      and needs only DP's volume.)
    * FSDP: all-gather the parameters for forward, the blocks' again for backward, reduce-scatter
      the gradients: ``(N-1)/N * 4 (Psi + Psi_blocks + Psi)``.
    * PP: a stage sends its output activations forward (``A``, unless it is the last) and the
      gradient of its input backward (``A``, unless it is the first).
    * TP: ``tp_comm_formula``: 4 all-reduces of ``A`` per block.

    One row per (strategy, rank) with ``comm_bytes``; infeasible strategies are left out.
    """
    gpt = _meta_gpt(model, vocab_size)
    cfg = gpt.cfg
    psi = 4 * count_params(gpt)
    psi_blocks = 4 * sum(count_params(b) for b in gpt.blocks)
    n = world_size
    activation = global_batch_size * cfg.block_size * cfg.d_model * 4
    blocked = feasibility(model, n)
    rows = []
    for r in range(n):
        rows.append(("ddp", r, 2 * (n - 1) / n * psi))
        rows.append(("zero1", r, 2 * (n - 1) / n * psi + (n - 1) / n * psi))
        rows.append(("fsdp", r, (n - 1) / n * (2 * psi + psi_blocks)))
        if "pp-gpipe" not in blocked:
            rows.append(("pp-gpipe", r, activation * ((r < n - 1) + (r > 0))))
    if "tp" not in blocked:
        tp = tp_comm_formula(model, n, global_batch_size, clip=clip, vocab_size=vocab_size)
        rows += [("tp", r, b) for r, b in enumerate(tp)]
    frame = pd.DataFrame(rows, columns=["strategy", "rank", "comm_bytes"])
    frame["_order"] = frame["strategy"].map(STRATEGIES.index)
    frame = frame.sort_values(["_order", "rank"], kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True)


def plan(
    model: str,
    world_size: int,
    global_batch_size: int = 16,
    precision: str = "fp32",
    *,
    vocab_size: int | None = None,
) -> pd.DataFrame:
    """``memory_formula`` and ``comm_formula`` side by side, one row per (strategy, rank)."""
    memory = memory_formula(model, world_size, precision, vocab_size=vocab_size)
    comm = comm_formula(model, world_size, global_batch_size, vocab_size=vocab_size)
    return memory.merge(comm, on=["strategy", "rank"], how="left", validate="one_to_one")


def busiest_rank(frame: pd.DataFrame) -> pd.DataFrame:
    """Per strategy of ``plan``'s table: its fullest rank (whose memory decides what fits), with
    the most bytes any of its ranks sends per step; strategies in their order of appearance."""
    rows = []
    for strategy, part in frame.groupby("strategy", sort=False):
        top = part.loc[part["total_bytes"].idxmax()]
        parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "total_bytes")
        rows.append(
            {
                "strategy": strategy,
                "rank": int(top["rank"]),
                **{column: top[column] for column in parts},
                "comm_bytes": part["comm_bytes"].max(),
            }
        )
    return pd.DataFrame(rows)


def plan_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """``busiest_rank`` for reading: strategy names, MiB per rank and MB sent per step."""
    top = busiest_rank(frame)
    return pd.DataFrame(
        {
            "strategy": top["strategy"].map(STRATEGY_LABELS),
            "fullest rank": top["rank"],
            "MiB per rank": (top["total_bytes"] / 2**20).round(1),
            "MB sent per step (most)": (top["comm_bytes"] / 1e6).round(1),
        }
    )


# ---------------------------------------------------------------------------------------------
# 4. Measured: each strategy trained for a few steps in the same worker processes
# ---------------------------------------------------------------------------------------------


MEMORY_COLUMNS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")


def measure_strategies(
    strategies: tuple[str, ...] = STRATEGIES,
    model: str = "micro",
    world_size: int = 2,
    *,
    steps: int = 3,
    global_batch_size: int = 8,
    progress: bool = True,
    **config: Any,
) -> pd.DataFrame:
    """Train each strategy for ``steps`` steps on ``world_size`` Gloo processes; measure each rank.

    All strategies run one after the other in the same processes (``labkit.launch.run_many``,
    paying the start-up once), profiled (``profile=True``), with the same config (``TrainConfig``
    fields in ``config``; ``micro_batches``, 2 by default, applies to the pipeline only).
    One row per (strategy, rank), all measured: ``params_bytes``, ``grads_bytes``,
    ``optimizer_bytes`` and ``activations_bytes`` (``RunResult.memory``), ``total_bytes``
    (the first three), ``payload_bytes`` (the messages handed to the backend per step) and
    ``wire_bytes`` (those messages times the ring's factor, ``labkit.lessons.traffic``);
    next to them ``comm_bytes``, labkit's counter (the ring formula applied to the strategy's
    plan), ``step_time_s`` (median after the first step) and the last ``loss``.
    """
    from labkit.launch import run_many
    from labkit.lessons.traffic import measured_traffic

    base = dict(
        model=model,
        world_size=world_size,
        steps=steps,
        global_batch_size=global_batch_size,
        eval_every=0,
        progress=False,
        profile=True,
    )
    base.update(config)
    pp_micro_batches = base.pop("micro_batches", 2)
    configs = [
        TrainConfig(
            strategy=s, **base, micro_batches=pp_micro_batches if s.startswith("pp-") else 1
        )
        for s in strategies
    ]
    results = run_many(configs, progress=progress, desc=" + ".join(strategies))
    rows = []
    for cfg, result in zip(configs, results, strict=True):
        traffic = measured_traffic(result).groupby("rank")[["payload_bytes", "ring_wire_bytes"]]
        traffic = traffic.sum()
        m = result.metrics
        steady = m[m["step"] >= 1] if m["step"].nunique() > 1 else m
        for rank, mem in result.memory.set_index("rank").iterrows():
            mine = steady[steady["rank"] == rank]
            rows.append(
                {
                    "strategy": cfg.strategy,
                    "rank": int(rank),
                    **{k: int(mem[k]) for k in MEMORY_COLUMNS},
                    "payload_bytes": float(traffic["payload_bytes"].get(rank, 0.0)),
                    "wire_bytes": float(traffic["ring_wire_bytes"].get(rank, 0.0)),
                    "comm_bytes": int(mine["comm_bytes"].median()),
                    "step_time_s": float(mine["step_time_s"].median()),
                    "loss": float(m[m["rank"] == rank]["loss"].iloc[-1]),
                }
            )
    frame = pd.DataFrame(rows)
    frame["total_bytes"] = frame[["params_bytes", "grads_bytes", "optimizer_bytes"]].sum(axis=1)
    return frame


def measured_vs_formula(measured: pd.DataFrame, **formula_kwargs: Any) -> pd.DataFrame:
    """The measured table next to ``plan`` for the same preset and world size, in MiB and MB.

    ``formula_kwargs`` go to ``plan`` (``model``, ``world_size``, ``global_batch_size``).
    Columns: strategy, rank, measured and formula total memory (MiB), measured and formula
    bytes sent per step (MB), and each measured/formula ratio.
    """
    formula = plan(**formula_kwargs)
    both = measured.merge(
        formula, on=["strategy", "rank"], how="left", suffixes=("", "_formula"), validate="1:1"
    )
    mib, mb = 2**20, 1e6
    return pd.DataFrame(
        {
            "strategy": both["strategy"].map(STRATEGY_LABELS),
            "rank": both["rank"],
            "memory MiB": (both["total_bytes"] / mib).round(3),
            "memory MiB (formula)": (both["total_bytes_formula"] / mib).round(3),
            "sent MB/step (measured messages, ring)": (both["wire_bytes"] / mb).round(3),
            "sent MB/step (labkit's counter)": (both["comm_bytes"] / mb).round(3),
            "sent MB/step (formula)": (both["comm_bytes_formula"] / mb).round(3),
        }
    )
