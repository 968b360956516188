"""Multi-process runs end: a failing or killed rank fails the run fast, names the rank, leaves nothing."""

import threading
import time

import psutil
import pytest

import labkit
from labkit import WorkerError

pytestmark = pytest.mark.distributed
DP = dict(model="nano", steps=6, global_batch_size=8, progress=False, world_size=2)


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


def _assert_no_workers_left() -> None:
    deadline = time.monotonic() + 5
    while _children() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in _children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, [p.cmdline() for p in left]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("raise:1:2", "RuntimeError: injected fault on rank 1 at step 2"), ("kill:1:2", "SIGKILL")],
)
def test_failing_rank_fails_the_run_quickly_and_is_named(fault, expected):
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 failed") as info:
        labkit.run(strategy="dp-naive", fault=fault, **DP)
    assert info.value.rank == 1
    assert expected in str(info.value)
    assert time.monotonic() - start < 60
    _assert_no_workers_left()


def test_two_runs_at_once_do_not_collide():
    results, errors = {}, []

    def go(name, strategy):
        try:
            results[name] = labkit.run(strategy=strategy, **DP)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=go, args=(n, "dp-naive")) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert results["a"].compare(results["b"])["relative_difference"].max() == 0.0
    _assert_no_workers_left()


def test_run_gathers_every_rank():
    result = labkit.run(strategy="dp-naive", **DP)
    assert sorted(result.metrics["rank"].unique()) == [0, 1]
    assert set(result.timeline["rank"]) == {0, 1}
    # Both ranks report the same global loss and learning rate at every step.
    per_step = result.metrics.groupby("step")
    assert (per_step["loss"].nunique() == 1).all()
    assert (per_step["lr"].nunique() == 1).all()
    assert result.logs.keys() == {0, 1}


def test_interrupt_stops_every_worker_and_the_caller_stays_usable():
    # What a notebook's "interrupt kernel" does: KeyboardInterrupt in the main thread mid-run.
    import _thread

    timer = threading.Timer(6.0, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            labkit.run(strategy="dp-naive", **{**DP, "steps": 100_000})
    finally:
        timer.cancel()
    assert time.monotonic() - start < 30
    _assert_no_workers_left()
    # The same process can start the next run right away.
    assert len(labkit.run(strategy="dp-naive", **DP).metrics) == 2 * DP["steps"]
