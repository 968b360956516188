"""Context parallelism (TrainConfig.cp) in training: equal to one process, alone and with dp.

Ring attention itself (output and gradients against dense attention) is tested in
``test_ring_attention``; here the whole trainer runs with each sequence split over cp ranks,
clipping at every step under a warm-up schedule, with gradient accumulation.
"""

from __future__ import annotations

import re

import pytest

import labkit
from labkit.config import TrainConfig
from labkit.lessons.context_parallel import ring_bytes_formula
from labkit.parallel.mesh import layout

REL = 1e-5
BASE = dict(
    model="nano",
    steps=3,
    global_batch_size=8,
    grad_accum_steps=2,
    clip="norm",
    max_norm=0.05,
    schedule="cosine",
    warmup_steps=2,
    eval_every=2,
    progress=False,
    timeout_s=120.0,
)
RUNS = {
    "cp2": dict(cp=2),
    "preset-cp-x4": dict(strategy="cp", world_size=4),
    "dp2-cp2-ddp": dict(dp=2, cp=2, dp_impl="ddp"),
}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def single() -> labkit.RunResult:
    return labkit.run(**BASE)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_context_parallel_equals_single_process(single, name):
    result = labkit.run(**BASE, **RUNS[name])
    diff = single.compare(result)
    worst = diff.loc[diff["relative_difference"].idxmax()]
    assert worst["relative_difference"] <= REL, f"{worst['name']} differs: {worst.to_dict()}"
    # The loss and validation loss each cp rank reports are the whole batch's.
    m, ref = result.metrics, single.metrics
    last = m[m["step"] == m["step"].max()]
    assert last["loss"].sub(float(ref["loss"].iloc[-1])).abs().max() < 1e-5
    assert last["val_loss"].sub(float(ref["val_loss"].iloc[-1])).abs().max() < 1e-5
    # Ring attention's sends, counted as they leave, are the formula's: 6W - 4 blocks per layer.
    assert (m["comm_bytes_cp"] == ring_bytes_formula(result.config)).all()


@pytest.mark.distributed
def test_activation_memory_per_rank_falls_as_one_over_cp(single):
    # Every saved activation is per token, and each cp rank holds 1/cp of the tokens.
    result = labkit.run(**BASE, cp=2)
    full = int(single.memory["activations_bytes"].iloc[0])
    per_rank = result.memory["activations_bytes"]
    assert (per_rank.sub(full / 2).abs() <= 0.01 * full).all(), (full, per_rank.tolist())


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(cp=2, pp=2), "TrainConfig.cp", "composes with dp here, not with pp"),
        (dict(cp=2, tp=2), "TrainConfig.cp", "not with tp"),
        (dict(cp=2, dp=2, dp_impl="zero2"), "TrainConfig.dp_impl", "average over dp x cp"),
        (dict(cp=2, block_size=6), "TrainConfig.block_size", "2\\*cp=4 equal chunks"),
        (dict(cp=3), "TrainConfig.cp", "multiple"),
        (dict(cp=2, world_size=3), "TrainConfig.world_size", "dp\\*pp\\*cp\\*tp = 1\\*1\\*2\\*1"),
    ],
)
def test_bad_context_parallel_config_is_named(kwargs, field, words):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        TrainConfig(model="nano", global_batch_size=8, **kwargs)
    assert re.search(words, str(err.value)), str(err.value)


def test_cp_preset_and_layout_name_each_ranks_tokens():
    cfg = TrainConfig(model="nano", strategy="cp", world_size=2, global_batch_size=8)
    assert (cfg.cp, cfg.dp, cfg.label) == (2, 1, "cp x2")
    assert TrainConfig(model="nano", dp=2, cp=2, global_batch_size=8).label == (
        "dp2 x cp2 (bucketed)"
    )
    table = layout(TrainConfig(model="nano", dp=2, cp=2, global_batch_size=8))
    # cp is inside dp: ranks 0 and 1 share rows 0..3, each with one early and one late chunk.
    assert table.loc[0, "rows"] == table.loc[1, "rows"] == "0..3"
    assert table.loc[0, "tokens"] == "0..7, 24..31"
    assert table.loc[1, "tokens"] == "8..15, 16..23"
    assert table.loc[2, "rows"] == "4..7"
