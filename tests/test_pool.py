"""The warm worker pool: repeated runs reuse processes, stay equal to fresh runs, fail cleanly."""

import _thread
import os
import signal
import threading
import time

import psutil
import pytest
import torch

import labkit
from labkit import WorkerError, supervisor

pytestmark = pytest.mark.distributed
DP = dict(model="nano", steps=4, global_batch_size=8, progress=False, world_size=2, seed=2)


@pytest.fixture
def pool():
    labkit.launch.keep_workers(True)
    try:
        yield
    finally:
        labkit.launch.keep_workers(None)
        labkit.launch.close_pool()


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _workers_left() -> list[psutil.Process]:
    deadline = time.monotonic() + 5
    while True:
        left = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.is_running() and "labkit._worker" in " ".join(p.cmdline())
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_consecutive_runs_reuse_the_processes_and_equal_a_fresh_run(pool):
    labkit.launch.keep_workers(False)
    fresh = labkit.run(strategy="dp-bucketed", **DP)  # one-shot workers
    assert supervisor.pool_pids() == []
    labkit.launch.keep_workers(True)
    labkit.run(strategy="ddp", **DP)  # builds the pool
    pids = supervisor.pool_pids()
    assert len(pids) == 2
    again = labkit.run(strategy="dp-bucketed", **DP)
    assert supervisor.pool_pids() == pids
    assert _same(fresh, again)
    # A single-process run leaves the pool alone; another world size replaces it.
    labkit.run(strategy="single", model="nano", steps=1, progress=False)
    assert supervisor.pool_pids() == pids
    labkit.run(strategy="ddp", **{**DP, "world_size": 4})
    assert len(supervisor.pool_pids()) == 4
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_a_killed_pool_worker_fails_the_run_by_rank_and_the_next_run_builds_a_new_pool(pool):
    labkit.run(strategy="ddp", **DP)
    pids = supervisor.pool_pids()
    with pytest.raises(WorkerError, match="rank 1 failed.*SIGKILL"):
        labkit.run(strategy="ddp", fault="kill:1:1", **DP)
    assert supervisor.pool_pids() == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    labkit.run(strategy="ddp", **DP)
    new = supervisor.pool_pids()
    assert new and not set(new) & set(pids)
    # A worker killed while the pool waits is replaced silently at the next run.
    os.kill(new[0], signal.SIGKILL)
    time.sleep(0.3)
    result = labkit.run(strategy="ddp", **DP)
    assert len(result.metrics) == 2 * DP["steps"]
    assert supervisor.pool_pids() and supervisor.pool_pids()[0] != new[0]


def test_an_interrupted_pooled_run_leaves_no_process_and_the_next_run_works(pool):
    labkit.run(strategy="ddp", **DP)
    timer = threading.Timer(3.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            labkit.run(strategy="ddp", **{**DP, "steps": 100_000})
    finally:
        timer.cancel()
    assert supervisor.pool_pids() == []
    assert not _workers_left()
    assert len(labkit.run(strategy="ddp", **DP).metrics) == 2 * DP["steps"]


def test_scripts_do_not_keep_workers():
    labkit.run(strategy="ddp", **DP)
    assert supervisor.pool_pids() == []
    assert not _workers_left()
