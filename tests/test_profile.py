"""TrainConfig.profile: a torch.profiler trace per rank, and communication spans from what ran.

With ``profile=True`` the timeline's communication spans are the backend's own records
(``gloo:all_reduce``, ``gloo:all_gather``, ...), so torch's DDP and FSDP2, whose collectives
labkit never calls itself, show them like every other strategy.
"""

from __future__ import annotations

import json

import pytest

import labkit
from labkit.timeline import COMM_PHASES

BASE = dict(model="nano", steps=2, global_batch_size=4, progress=False, profile=True)


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("strategy", "extra", "expected"),
    [
        ("fsdp", {}, {"allgather"}),
        ("ddp", {}, {"allreduce"}),
        ("dp-bucketed", {}, {"allreduce"}),
        ("pp-1f1b", {"micro_batches": 2}, {"send", "recv"}),
    ],
)
def test_profiled_runs_have_measured_communication_and_a_trace_per_rank(
    strategy, extra, expected, tmp_path
):
    result = labkit.run(**BASE, strategy=strategy, world_size=2, trace_dir=str(tmp_path), **extra)
    assert [p.rsplit("/", 1)[-1] for p in result.trace_files] == ["rank0.json", "rank1.json"]
    for path in result.trace_files:
        events = json.loads(open(path).read())["traceEvents"]
        assert any(e.get("name", "").startswith("gloo:") for e in events), path
    tl = result.timeline
    comm = tl[tl["phase"].isin(COMM_PHASES)]
    assert expected <= set(comm["phase"]), set(comm["phase"])
    assert ((comm["end_s"] - comm["start_s"]) > 0).all()
    assert set(comm["rank"]) == {0, 1} and set(comm["step"]) <= {0, 1}


def test_a_single_process_profile_writes_one_trace(tmp_path):
    result = labkit.run(**BASE, trace_dir=str(tmp_path))
    assert len(result.trace_files) == 1
    assert json.loads(open(result.trace_files[0]).read())["traceEvents"]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_measured_payload_of_dp_naive_is_its_gradients_and_gloo_has_no_reduce_scatter(tmp_path):
    from labkit.config import TrainConfig
    from labkit.train import build_model

    kw = dict(BASE, eval_every=0, trace_dir=str(tmp_path))
    grads = sum(p.numel() * 4 for p in build_model(TrainConfig(**kw)).parameters())
    naive = labkit.run(**kw, strategy="dp-naive", world_size=2).collectives
    per_step = naive[naive["phase"] == "allreduce"].groupby(["rank", "step"])["payload_bytes"]
    # What Gloo was handed each step: every gradient tensor once, plus the loss (one float32).
    # Gloo's all-reduce runs a ring (its default algorithm), so each rank puts 2 (N-1)/N of
    # each payload on the wire: that factor is a prediction, the payload is measured.
    assert (per_step.sum() == grads + 4).all(), per_step.sum()
    # FSDP2 asks for reduce-scatters; Gloo has none and runs an all-reduce of the whole
    # gradient instead (then keeps a shard): twice a ring reduce-scatter's bytes.
    fsdp = labkit.run(**kw, strategy="fsdp", world_size=2).collectives
    reduced = fsdp[fsdp["phase"] == "allreduce"].groupby(["rank", "step"])["payload_bytes"]
    assert (reduced.sum() >= grads).all()
    assert "reduce_scatter" not in set(fsdp["phase"])


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_collectives_of_an_evaluation_stay_off_the_step_they_follow(tmp_path):
    kw = dict(BASE, eval_every=1, trace_dir=str(tmp_path), micro_batches=2)
    result = labkit.run(**kw, strategy="pp-1f1b", world_size=2)
    col = result.collectives
    assert {"train", "eval"} == set(col["during"])  # the pipeline evaluates through its stages
    tl = result.timeline
    comm = tl[tl["phase"].isin(COMM_PHASES)]
    assert len(comm) == (col["during"] == "train").sum()
    # Every communication span on the timeline lies inside its own step's time on that rank.
    m = result.metrics.set_index(["rank", "step"])
    for (rank, step), spans in comm.groupby(["rank", "step"]):
        first = tl[(tl["rank"] == rank) & (tl["step"] == step)]["start_s"].min()
        assert spans["end_s"].max() - first <= m.loc[(rank, step), "step_time_s"] + 1e-3
