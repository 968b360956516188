"""The equivalence invariant for every data-parallel strategy, on two real Gloo processes.

One configuration exercises everything at once, so each strategy costs one launch: clipping by
norm with a small ``max_norm`` (it clips at every step), a cosine schedule with warm-up, gradient
accumulation over two micro-batches, a frozen parameter, and a global batch of 7 rows that two
ranks split 4 + 3. After a few steps the weights, losses, gradient norms and learning rates must
match the single-process run. ``fsdp`` checkpoints sharded state, so it is also stopped
half-way and resumed from a checkpoint.
"""

from __future__ import annotations

import pytest
import torch

import labkit
from labkit.config import TrainConfig
from labkit.lessons.data_parallel import memory_per_rank
from labkit.train import build_model

MAX_NORM = 0.05
BASE = dict(
    model="nano",
    steps=4,
    global_batch_size=7,  # 4 + 3 rows on two ranks, then 2 + 2 and 2 + 1 per micro-batch
    grad_accum_steps=2,
    clip="norm",
    max_norm=MAX_NORM,
    schedule="cosine",
    warmup_steps=2,
    freeze=("embed.pos",),
    progress=False,
    timeout_s=60.0,
    layer_norms=True,
)
STRATEGIES = ["dp-naive", "dp-bucketed", "ddp", "zero1", "zero2", "zero3", "fsdp"]
REL = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def single() -> labkit.RunResult:
    """The reference: the same configuration in one process."""
    return labkit.run(**BASE)


def assert_equivalent(single: labkit.RunResult, result: labkit.RunResult) -> None:
    """Weights, per-step losses, grad norms and LRs equal the single-process run's."""
    diff = single.compare(result)
    worst = diff.loc[diff["relative_difference"].idxmax()]
    assert worst["relative_difference"] <= REL, f"{worst['name']} differs: {worst.to_dict()}"

    ref = single.metrics.set_index("step")
    m = result.metrics
    assert sorted(m["rank"].unique()) == [0, 1]
    for rank in (0, 1):
        mine = m[m["rank"] == rank].set_index("step")
        assert list(mine.index) == list(ref.index)
        for column in ("loss", "grad_norm", "grad_norm_clipped"):
            torch.testing.assert_close(
                torch.tensor(mine[column].to_numpy()),
                torch.tensor(ref[column].to_numpy()),
                rtol=REL,
                atol=0,
                msg=f"rank {rank} {column}",
            )
        # The LR is a pure function of the step: bit-identical everywhere.
        assert mine["lr"].tolist() == ref["lr"].tolist()

    # Per-parameter gradient norms (before clipping), on every rank, even where each rank holds
    # only a shard of the gradients (zero2, zero3, fsdp).
    want = single.layer_norms.set_index(["step", "name"])["grad_norm"]
    for rank in (0, 1):
        norms = result.layer_norms
        got = norms[norms["rank"] == rank].set_index(["step", "name"])["grad_norm"]
        assert set(got.index) == set(want.index)
        torch.testing.assert_close(
            torch.tensor(got.loc[want.index].to_numpy()),
            torch.tensor(want.to_numpy()),
            rtol=REL,
            atol=1e-9,
            msg=f"rank {rank} per-layer norms",
        )


def test_reference_really_clips_and_schedules(single):
    m = single.metrics
    assert (m["grad_norm"] > 10 * MAX_NORM).all()
    assert m["grad_norm_clipped"].to_numpy() == pytest.approx(MAX_NORM, rel=1e-4)
    assert m["lr"].tolist()[:3] == pytest.approx([0.0, 0.0015, 0.003])  # warm-up, then decay


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_single_process(single, strategy):
    result = labkit.run(strategy=strategy, world_size=2, **BASE)
    assert_equivalent(single, result)

    # The frozen parameter is exactly its initial value; its trainable neighbour moved.
    initial = build_model(TrainConfig(**BASE))
    trained = result.state_dict()
    assert torch.equal(trained["embed.pos.weight"], initial.state_dict()["embed.pos.weight"])
    assert not torch.equal(trained["embed.tok.weight"], initial.state_dict()["embed.tok.weight"])

    # The 7-row batch really split unevenly: rank 0 read 4 sequences a step, rank 1 read 3.
    m = result.metrics
    block = initial.cfg.block_size
    local_tokens = (m["tokens_per_s"] * m["step_time_s"]).round()
    assert (local_tokens[m["rank"] == 0] == 4 * block).all()
    assert (local_tokens[m["rank"] == 1] == 3 * block).all()

    # Gradients were communicated, and the timeline shows it.
    assert (m["comm_bytes"] > 0).all()
    phases = set(result.timeline["phase"])
    if strategy in ("zero2", "zero3"):  # ZeRO-2/3 by hand: reduce-scatter + all-gather
        assert {"reduce_scatter", "allgather"} <= phases, phases
    elif strategy != "fsdp":  # FSDP's collectives run inside torch, unseen
        assert "allreduce" in phases, phases


def test_fsdp_resumes_from_its_sharded_checkpoint(single, tmp_path):
    # Each rank saves its local shards and its DTensor optimizer state; resuming half-way must
    # land on the same weights. (ShardedOptimizer's state_dict has its own building-block test.)
    kw = dict(BASE, strategy="fsdp", world_size=2, checkpoint_dir=str(tmp_path))
    labkit.run(stop_after=2, checkpoint_every=2, **kw)
    resumed = labkit.run(resume=True, **kw)
    assert resumed.metrics["step"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # restored rows + new
    assert_equivalent(single, resumed)


def test_memory_per_rank_follows_the_zero_formulas():
    frame = memory_per_rank(("ddp", "zero1", "fsdp"), model="nano", world_size=2)
    assert len(frame) == 6  # three strategies, two ranks
    psi = int(frame["n_params"].iloc[0])
    by = frame.set_index(["strategy", "rank"])
    for rank in (0, 1):
        ddp, zero1, fsdp = (by.loc[(s, rank)] for s in ("ddp", "zero1", "fsdp"))
        # Plain DP: everything replicated, fp32 weights and grads, two Adam moments.
        assert ddp["params_bytes"] == ddp["grads_bytes"] == 4 * psi
        assert ddp["optimizer_bytes"] == pytest.approx(8 * psi, rel=0.01)
        # ZeRO-1: only the optimizer state is halved (the greedy partition is nearly even).
        assert zero1["params_bytes"] == zero1["grads_bytes"] == 4 * psi
        assert zero1["optimizer_bytes"] == pytest.approx(4 * psi, rel=0.05)
        # FSDP (ZeRO-3): everything halved (dim-0 shards, a little padding).
        for column, full in (("params_bytes", 4), ("grads_bytes", 4), ("optimizer_bytes", 8)):
            assert fsdp[column] == pytest.approx(full * psi / 2, rel=0.05), column
    assert (frame["measured_over_paper"] - 1).abs().max() < 0.05
