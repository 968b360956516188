"""Bytes on the wire: measured messages (profiler) against labkit's counter (formula).

On Gloo an all-reduce, an all-gather and a broadcast run as asked; a reduce-scatter runs as an
all-reduce of the whole tensor. These tests pin both facts: where the strategy's plan uses only
the first three, the ring estimate from the measured messages equals the counter; where it
reduce-scatters (ZeRO-2), the measured messages carry half as much again.
"""

from __future__ import annotations

import pytest

from labkit.config import TrainConfig
from labkit.launch import run_many
from labkit.lessons.traffic import measured_traffic, traffic_table

KW = dict(model="micro", steps=3, global_batch_size=4, eval_every=1, progress=False, profile=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    names = ("dp-naive", "zero1", "zero2")
    configs = [
        TrainConfig(**KW, strategy=s, world_size=2, trace_dir=str(tmp_path_factory.mktemp(s)))
        for s in names
    ]
    return dict(zip(names, run_many(configs, progress=False), strict=True))


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_measured_messages_match_the_counter_where_gloo_runs_what_was_asked(runs):
    table = traffic_table(runs)
    # Gradients all-reduced (+ one float32 for the loss); zero1 adds a broadcast of each shard.
    assert table.loc["dp-naive", "wire_over_counter"] == pytest.approx(1.0, rel=1e-4)
    assert table.loc["zero1", "wire_over_counter"] == pytest.approx(1.0, rel=1e-4)
    assert table.loc["zero1", "counter_MB"] == pytest.approx(
        1.5 * table.loc["dp-naive", "counter_MB"], rel=1e-4
    )


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_gloo_runs_zero2s_reduce_scatter_as_an_all_reduce(runs):
    traffic = measured_traffic(runs["zero2"])
    assert "reduce_scatter" not in set(traffic["phase"])
    assert {"allreduce", "allgather"} <= set(traffic["phase"])
    ratio = traffic_table(runs).loc["zero2", "wire_over_counter"]
    assert ratio == pytest.approx(1.5, rel=1e-3)  # (all-reduce 1 + all-gather 0.5) / (0.5 + 0.5)


def test_measured_traffic_needs_a_profiled_run():
    import labkit

    run = labkit.run(model="nano", steps=1, global_batch_size=2, progress=False)
    with pytest.raises(ValueError, match="profile=True"):
        measured_traffic(run)
