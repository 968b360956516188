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
