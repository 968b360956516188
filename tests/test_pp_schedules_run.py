"""Interleaved 1F1B and ZB-H1 on real processes: equal to one process, and the split backward.

The orders themselves (and their simulated bubbles) are tested in ``test_pp_orders``; here the
executor runs them over Gloo. Every run clips at every step (``max_norm`` far below the
gradient norm) under a warm-up schedule, with gradient accumulation and a frozen parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import labkit
from labkit.config import TrainConfig
from labkit.model import Block, GPTConfig
from labkit.parallel.split_backward import WeightGradStash, split_linear_layers

REL = 1e-5
BASE = dict(
    steps=3,
    global_batch_size=8,
    grad_accum_steps=2,
    clip="norm",
    max_norm=0.05,
    schedule="cosine",
    warmup_steps=2,
    freeze=("embed.pos",),
    progress=False,
    timeout_s=120.0,
)
# medium has 6 blocks: 8 layers, enough for 4 ranks x 2 chunks; a short block keeps it cheap.
MODELS = {"nano": dict(model="nano"), "medium": dict(model="medium", block_size=16)}
RUNS = {
    "interleaved-p2-v2-m4": ("nano", dict(pp=2, pp_virtual_stages=2, micro_batches=4)),
    "zb-h1-p2-m4": ("nano", dict(pp=2, pp_schedule="zb-h1", micro_batches=4)),
    "interleaved-p4-v2-m4": ("medium", dict(pp=4, pp_virtual_stages=2, micro_batches=4)),
    "zb-h1-p4-m4": ("medium", dict(pp=4, pp_schedule="zb-h1", micro_batches=4)),
    # torch's twins drive the same chunks (virtual stage c * pp + rank) with its own schedule.
    "torch-interleaved-1f1b-p2-v2-m4": (
        "nano",
        dict(pp=2, pp_schedule="torch-interleaved-1f1b", pp_virtual_stages=2, micro_batches=4),
    ),
    "torch-interleaved-zb-p2-v2-m4": (
        "nano",
        dict(pp=2, pp_schedule="torch-interleaved-zb", pp_virtual_stages=2, micro_batches=4),
    ),
    # ZBV: two chunks per rank in a V, so rank 0 holds both the embedding and the head.
    "torch-zbv-p2-m4": (
        "nano",
        dict(pp=2, pp_schedule="torch-zbv", pp_virtual_stages=2, micro_batches=4),
    ),
    "interleaved-dp2-pp2-bucketed": (
        "nano",
        dict(dp=2, pp=2, pp_virtual_stages=2, micro_batches=2, dp_impl="bucketed"),
    ),
}
pytestmark = pytest.mark.timeout(300)


def _config(model: str, **kw: object) -> dict:
    kw.setdefault("pp_schedule", "interleaved-1f1b" if "pp_virtual_stages" in kw else "1f1b")
    return {**BASE, **MODELS[model], **kw}


@pytest.fixture(scope="module")
def singles() -> dict[str, labkit.RunResult]:
    return {name: labkit.run(**BASE, **kw) for name, kw in MODELS.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_new_schedules_equal_single_process(singles, name):
    model, kw = RUNS[name]
    result = labkit.run(**_config(model, **kw))
    diff = singles[model].compare(result)
    worst = diff.loc[diff["relative_difference"].idxmax()]
    assert worst["relative_difference"] <= REL, f"{worst['name']} differs: {worst.to_dict()}"
    tl = result.timeline
    forwards = tl[tl["phase"] == "forward"].groupby(["rank", "step"]).size()
    v, m = kw.get("pp_virtual_stages", 1), kw["micro_batches"] * BASE["grad_accum_steps"]
    assert (forwards == v * m).all(), "each rank runs every micro-batch once per chunk"
    weights = tl[tl["phase"] == "weight"]
    if "zb-h1" in name:
        # One W pass per micro-batch on every stage, each after that micro-batch's B.
        assert (weights.groupby(["rank", "step"]).size() == m).all()
        back = tl[tl["phase"] == "backward"].set_index(["rank", "step", "micro_batch"])
        for row in weights.itertuples():
            assert row.start_s >= back.loc[(row.rank, row.step, row.micro_batch), "end_s"]
    elif "zb" in name:  # torch's zero bubble: one W per micro-batch and chunk
        assert (weights.groupby(["rank", "step"]).size() == v * m).all()
    else:
        assert weights.empty


def _split_block() -> tuple[Block, Block, WeightGradStash]:
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8)
    torch.manual_seed(0)
    dense = Block(cfg)
    split = Block(cfg)
    split.load_state_dict(dense.state_dict())
    stash = WeightGradStash()
    assert split_linear_layers(split, stash) == 6  # q, k, v, proj, fc, mlp proj
    return dense, split, stash


def test_split_backward_defers_linear_weights_to_the_w_pass():
    dense, split, stash = _split_block()
    x = torch.randn(3, 8, 16)
    x_dense, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense(x_dense).square().sum().backward()
    stash.begin("mb0")
    split(x_split).square().sum().backward()
    stash.end()
    # B: the input's gradient is complete; the linear weights have none yet, layer norms do.
    torch.testing.assert_close(x_split.grad, x_dense.grad, rtol=1e-6, atol=1e-7)
    assert split.attn.q.weight.grad is None and split.mlp.fc.bias.grad is None
    assert split.ln1.weight.grad is not None
    stash.run("mb0")
    assert len(stash) == 0
    grads = {n: p.grad for n, p in split.named_parameters()}
    for name, p in dense.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_split_backward_accumulates_over_micro_batches_and_skips_frozen_weights():
    dense, split, stash = _split_block()
    for module in (dense, split):
        module.attn.v.weight.requires_grad_(False)
    xs = [torch.randn(2, 8, 16) for _ in range(2)]
    for i, x in enumerate(xs):
        dense(x).sum().backward()
        stash.begin(i)
        split(x).sum().backward()
        stash.end()
    for i in range(2):
        stash.run(i)
    assert split.attn.v.weight.grad is None
    for (name, p), q in zip(dense.named_parameters(), split.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_split_layer_outside_a_b_pass_fails_clearly():
    layer = nn.Linear(4, 4)
    split_linear_layers(layer, WeightGradStash())
    with pytest.raises(RuntimeError, match="outside a B pass"):
        layer(torch.randn(2, 4)).sum().backward()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(pp=2, pp_schedule="interleaved-1f1b", micro_batches=2), "pp_virtual_stages"),
        (dict(pp=2, pp_schedule="1f1b", pp_virtual_stages=2, micro_batches=2), "pp_virtual_stages"),
        (dict(pp_virtual_stages=2), "pp_virtual_stages"),
        (
            dict(pp=2, pp_schedule="interleaved-1f1b", pp_virtual_stages=2, micro_batches=3),
            "micro_batches",
        ),
        (
            dict(pp=2, pp_schedule="interleaved-1f1b", pp_virtual_stages=3, micro_batches=2),
            "pp_virtual_stages",
        ),
        (
            dict(
                dp=2,
                pp=2,
                dp_impl="fsdp",
                pp_schedule="interleaved-1f1b",
                pp_virtual_stages=2,
                micro_batches=2,
            ),
            "dp_impl",
        ),
        (dict(dp=2, pp=2, pp_schedule="zb-h1", micro_batches=2), "dp"),
        (dict(pp=2, tp=2, pp_schedule="zb-h1", micro_batches=2), "tp"),
        (dict(pp=2, pp_schedule="zb-h1", micro_batches=2, precision="bf16"), "precision"),
    ],
)
def test_unsupported_new_schedule_settings_are_refused_by_name(kw, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(model="nano", global_batch_size=8, **kw)


@pytest.mark.distributed
def test_resume_with_other_chunks_per_rank_is_refused(tmp_path):
    common = _config("nano", pp=2, micro_batches=4, checkpoint_dir=str(tmp_path))
    labkit.run(**{**common, "steps": 2, "checkpoint_every": 1})
    other = {**common, "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2, "resume": True}
    with pytest.raises(ValueError, match="pp_virtual_stages=1"):
        labkit.run(**other)


@pytest.mark.distributed
def test_resume_across_chunk_placements_is_refused(tmp_path):
    # Interleaving puts rank 0's chunks at virtual stages 0 and 2; ZBV at 0 and 3.
    common = _config(
        "nano", pp=2, pp_virtual_stages=2, micro_batches=4, checkpoint_dir=str(tmp_path)
    )
    labkit.run(**{**common, "steps": 2, "checkpoint_every": 1})
    with pytest.raises(ValueError, match="ranks hold other chunks"):
        labkit.run(**{**common, "pp_schedule": "torch-zbv", "resume": True})


def test_the_stash_counts_as_activations_until_its_w_pass():
    from labkit.memory import SavedTensorMeter

    _, split, _ = _split_block()
    meter = SavedTensorMeter(
        exclude=lambda: {p.untyped_storage()._cdata for p in split.parameters()}
    )
    stash = WeightGradStash(keep=meter.keep)
    split_linear_layers(split, stash)  # now through the counting stash
    with meter:
        x = torch.randn(3, 8, 16, requires_grad=True)
        out = split(x)
        during_forward = meter.live
        stash.begin(0)
        out.sum().backward()
        stash.end()
        del out
        held = meter.live  # the graph is gone: what is left is the stash's x and dy
        stash.run(0)
        after = meter.live
    assert during_forward > 0
    assert held > 0 and after == 0


def test_torch_twins_are_gated_on_the_installed_torch(monkeypatch):
    import torch.distributed.pipelining as pipelining

    kw = dict(model="nano", pp=2, pp_virtual_stages=2, micro_batches=4, global_batch_size=8)
    assert TrainConfig(**kw, pp_schedule="torch-interleaved-1f1b").pp_virtual_stages == 2
    monkeypatch.delattr(pipelining, "ScheduleInterleaved1F1B")
    with pytest.raises(
        ValueError, match=r"TrainConfig\.pp_schedule=.*has no .*ScheduleInterleaved1F1B"
    ):
        TrainConfig(**kw, pp_schedule="torch-interleaved-1f1b")


def test_chunks_need_a_chunked_schedule():
    with pytest.raises(
        ValueError, match=r"TrainConfig\.pp_virtual_stages=2.*'torch-interleaved-zb'"
    ):
        TrainConfig(
            model="nano", pp=2, pp_virtual_stages=2, pp_schedule="torch-1f1b", micro_batches=4
        )
    with pytest.raises(ValueError, match=r"torch-zbv places exactly 2 chunks per rank"):
        TrainConfig(
            model="medium", pp=2, pp_virtual_stages=3, pp_schedule="torch-zbv", micro_batches=4
        )
    with pytest.raises(ValueError, match=r"torch-interleaved-zb needs at least 2 chunks"):
        TrainConfig(model="nano", pp=2, pp_schedule="torch-interleaved-zb", micro_batches=4)
