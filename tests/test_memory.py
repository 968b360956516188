"""Measured memory per rank (RunResult.memory) and activation recomputation.

Parameters, gradients and optimizer state are counted from the storages a rank holds;
activations from the tensors autograd saves for backward (saved_tensors_hooks). Recomputation
must leave the weights unchanged and cut the measured activations.
"""

from __future__ import annotations

import pytest

import labkit
from labkit.config import TrainConfig

COLUMNS = {
    "rank",
    "params_bytes",
    "grads_bytes",
    "optimizer_bytes",
    "activations_bytes",
    "peak_bytes",
}
SMALL = dict(model="small", steps=2, global_batch_size=8, progress=False, timeline=False)


@pytest.fixture(scope="module")
def recomputed() -> dict[str, labkit.RunResult]:
    return {mode: labkit.run(**SMALL, recompute=mode) for mode in ("none", "selective", "full")}


def test_recompute_keeps_the_weights_and_cuts_the_measured_activations(recomputed):
    none = recomputed["none"]
    for mode in ("selective", "full"):
        assert none.compare(recomputed[mode])["relative_difference"].max() <= 1e-6, mode
    act = {m: int(r.memory["activations_bytes"].iloc[0]) for m, r in recomputed.items()}
    assert act["full"] <= 0.6 * act["none"], act
    assert act["full"] < act["selective"] < act["none"], act


def test_memory_has_every_category_and_adam_keeps_two_moments(recomputed):
    mem = recomputed["none"].memory
    assert COLUMNS <= set(mem.columns)
    row = mem.iloc[0]
    assert row["grads_bytes"] == row["params_bytes"]  # fp32: one gradient per parameter
    # AdamW: two fp32 moments per parameter, plus one step counter per tensor.
    assert row["optimizer_bytes"] == pytest.approx(2 * row["params_bytes"], rel=1e-3)
    assert row["peak_bytes"] >= row["params_bytes"] + row["activations_bytes"]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_the_zero_stages_shard_what_they_say_measured():
    kw = dict(model="micro", steps=2, global_batch_size=4, progress=False, timeline=False)
    full = labkit.run(**kw).memory.iloc[0]
    rows = {}
    for strategy in ("dp-bucketed", "zero1", "zero2", "zero3", "fsdp"):
        rows[strategy] = labkit.run(**kw, strategy=strategy, world_size=2).memory
        assert len(rows[strategy]) == 2 and COLUMNS <= set(rows[strategy].columns)

    def frac(strategy: str, column: str) -> float:
        return float(rows[strategy][column].max() / full[column])

    assert frac("dp-bucketed", "optimizer_bytes") == pytest.approx(1.0, rel=1e-3)
    assert frac("zero1", "optimizer_bytes") < 0.6  # optimizer state sharded
    assert frac("zero1", "grads_bytes") == pytest.approx(1.0, rel=1e-3)
    assert frac("zero2", "grads_bytes") < 0.51  # + gradients sharded
    assert frac("zero2", "params_bytes") == pytest.approx(1.0, rel=1e-3)
    assert frac("zero3", "params_bytes") < 0.51  # + parameters sharded...
    z3 = rows["zero3"]
    assert (z3["peak_params_bytes"] > z3["params_bytes"]).all()  # ...gathered one at a time
    # FSDP2's gathered blocks are parameters too: they raise the parameter peak and are not
    # counted again as activations (F.linear saves a view of the gathered weight), so FSDP's
    # activations are exactly those of the hand-written ZeRO-3 on the same model and batch.
    fsdp = rows["fsdp"]
    assert frac("fsdp", "params_bytes") < 0.6
    assert (fsdp["peak_params_bytes"] > 1.2 * fsdp["params_bytes"]).all()
    assert (fsdp["activations_bytes"] == z3["activations_bytes"]).all()


def test_recompute_is_validated():
    with pytest.raises(ValueError, match=r"TrainConfig\.recompute"):
        TrainConfig(recompute="some")
