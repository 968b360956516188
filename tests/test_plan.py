"""The planner: its memory model equals what runs measure, its parts add up, bad plans are refused.

Step-time accuracy is a benchmark (``labkit bench plan``), not a test: timings on a shared
2-core machine are not fit to assert on. Memory is deterministic, so it is asserted here against
``RunResult.memory`` for one process and for meshes of every kind.
"""

from __future__ import annotations

import math

import pytest

import labkit
from labkit import plan
from labkit.launch import run_many
from labkit.lessons.planner import PLAN_RUN
from labkit.memory import SavedTensorMeter, storage_ids
from labkit.plan.comm import collective_time


def _measured_total(result: labkit.RunResult) -> float:
    return float(result.memory["peak_bytes"].max())


def _predicted_total(config: labkit.TrainConfig) -> float:
    p = plan.predict(config, plan.cluster("H100", 64))
    return sum(v for k, v in p.memory.items() if k != "transient_bytes")


@pytest.mark.parametrize(
    ("model", "recompute", "norm"),
    [("nano", "none", "pre"), ("micro", "full", "pre"), ("micro", "selective", "post")],
)
def test_memory_equals_the_meter_for_one_process(model: str, recompute: str, norm: str) -> None:
    cfg = labkit.TrainConfig(
        **{**PLAN_RUN, "steps": 2}, model=model, recompute=recompute, norm=norm
    )
    result = labkit.run(cfg)
    assert _predicted_total(cfg) == pytest.approx(_measured_total(result), rel=1e-3)
    p = plan.predict(cfg, plan.cluster("H100", 1))
    measured = result.memory.iloc[0]
    assert p.memory["activations_bytes"] == pytest.approx(measured["activations_bytes"], rel=1e-6)
    assert p.memory["params_bytes"] == measured["params_bytes"]


def test_block_activations_match_saved_tensors_of_a_llama_free_gpt_block() -> None:
    """The per-block count, on a shape no preset has (3 heads, a 96-token context)."""
    import torch

    from labkit.model import GPT, GPTConfig

    cfg = GPTConfig(n_layer=1, n_head=3, d_model=48, block_size=96, vocab_size=50)
    gpt = GPT(cfg)
    x = torch.randn(5, 96, 48, requires_grad=True)
    with SavedTensorMeter(lambda: storage_ids(gpt.parameters())) as meter:
        gpt.blocks[0](x)
    shape = plan.ModelShape("t", 1, 48, 3, 50, 96)
    kept, _ = shape.block_activations()
    assert meter.peak == 5 * 96 * kept * 4


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_memory_within_ten_percent_on_every_kind_of_mesh() -> None:
    meshes = [
        dict(dp=2, dp_impl="zero2"),
        dict(pp=2, micro_batches=2),
        dict(tp=2),
        dict(cp=2),
    ]
    configs = [labkit.TrainConfig(**{**PLAN_RUN, "steps": 2}, model="micro", **m) for m in meshes]
    for cfg, result in zip(configs, run_many(configs, progress=False), strict=True):
        got, want = _predicted_total(cfg), _measured_total(result)
        assert abs(got / want - 1) < 0.10, (cfg.label, got, want)


def test_parts_add_up_and_throughput_follows() -> None:
    p = plan.predict(
        dict(model="llama-3.1-8b", global_batch_size=64, dp=8, tp=8, dp_impl="fsdp"),
        plan.cluster("H100", 64),
    )
    assert p.step_time_s == pytest.approx(sum(p.time.values()))
    tokens = 64 * 8192
    assert p.tokens_per_s_per_gpu == pytest.approx(tokens / p.step_time_s / 64)
    assert 0 < p.mfu < p.cluster.card.efficiency  # overheads only take away


def test_more_pipeline_micro_batches_shrink_the_bubble() -> None:
    cluster = plan.cluster("A100", 16)
    base = dict(model="llama-2-7b", global_batch_size=64, pp=4, dp=4, precision="bf16")
    few = plan.predict({**base, "micro_batches": 4}, cluster)
    many = plan.predict({**base, "micro_batches": 16}, cluster)
    zb = plan.predict({**base, "micro_batches": 4, "pp_schedule": "zb-h1"}, cluster)
    assert many.bubble_s < few.bubble_s
    assert zb.bubble_s == pytest.approx(few.bubble_s / 3)


def test_sharding_trades_memory_for_traffic() -> None:
    cluster = plan.cluster("H100", 8)
    base = dict(model="llama-2-7b", global_batch_size=16, dp=8, recompute="full")
    ddp, zero1, fsdp = (
        plan.predict({**base, "dp_impl": d}, cluster) for d in ("ddp", "zero1", "fsdp")
    )
    assert ddp.memory["optimizer_bytes"] == pytest.approx(8 * zero1.memory["optimizer_bytes"])
    assert fsdp.memory["params_bytes"] == pytest.approx(ddp.memory["params_bytes"] / 8)
    assert not ddp.fits and fsdp.fits  # 7B with Adam does not fit replicated in 80 GB


def test_alpha_beta_fit_recovers_known_values() -> None:
    alpha, beta = 2e-4, 1e-9
    rows = []
    for n in (2, 4):
        for size in (4096, 65536, 1 << 20, 1 << 22):
            bus = 2 * (n - 1) / n * size
            rows.append({"world_size": n, "size_bytes": size, "time_s": alpha * n + bus * beta})
    fits = plan.fit_alpha_beta(rows)
    for n in (2, 4):
        assert fits[n][0] == pytest.approx(alpha * n, rel=1e-6)
        assert fits[n][1] == pytest.approx(beta, rel=1e-6)


def test_ring_and_tree_costs() -> None:
    cluster = plan.cluster("H100", 64)
    link = cluster.intra_link
    big = 1 << 30
    ring = collective_time("all_reduce", big, 8, cluster)
    assert ring == pytest.approx(14 * link.latency_s + 2 * 7 / 8 * big * link.beta_s_per_B)
    tiny = collective_time("all_reduce", 4, 64, cluster, stride=8)  # crosses nodes: tree wins
    assert tiny == pytest.approx(2 * math.ceil(math.log2(64)) * cluster.inter.latency_s, rel=1e-3)
    half = collective_time("reduce_scatter", big, 8, cluster)
    assert half == pytest.approx(ring / 2, rel=1e-3)


def test_search_ranks_fitting_meshes_first() -> None:
    table = plan.search("llama-3.1-70b", plan.cluster("H100", 64), 64, top=None)
    fits = table["fits"].tolist()
    assert fits[0] and fits == sorted(fits, reverse=True)
    fitting = table[table["fits"]]
    assert fitting["tokens_per_s_per_gpu"].is_monotonic_decreasing
    assert (table["dp"] * table["pp"] * table["tp"] == 64).all()
    assert not table[~table["fits"]].empty  # some meshes do not fit a 70B model


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(model="llama-3.1-70b", tp=3), "tp=3"),
        (dict(model="llama-3.1-70b", dp=3, global_batch_size=16), "global_batch_size=16"),
        (dict(model="llama-3.1-70b", pp_schedule="2f2b"), "pp_schedule='2f2b'"),
        (dict(model="llama-3.1-70b", bogus=1), "bogus"),
        (dict(model="gpt-5"), "model"),
        (dict(model="nano", tp=3), "tp"),  # a labkit preset goes through TrainConfig
    ],
)
def test_bad_plans_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan.predict(fields, plan.cluster("H100", 1024))


def test_a_mesh_larger_than_the_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 16 GPUs; the cluster has 8"):
        plan.predict(dict(model="llama-2-7b", dp=16, global_batch_size=16), plan.cluster("H100", 8))


def test_unknown_card_and_link_are_refused() -> None:
    with pytest.raises(ValueError, match="card='V100'"):
        plan.cluster("V100")
    with pytest.raises(ValueError, match="inter='carrier-pigeon'"):
        plan.cluster("H100", inter="carrier-pigeon")
