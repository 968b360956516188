"""The bug zoo: each seeded bug shows in the evidence it should, and only when switched on."""

from __future__ import annotations

import pytest

from labkit.config import TrainConfig
from labkit.lessons.bugzoo import CAUSES, SUSPECTS, check, evidence, investigate


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(bug="Z"), "bug='Z' is invalid: allowed: A, B, C, D"),
        (dict(bug="A"), "lives in the pipeline: set pp >= 2"),
        (dict(bug="C", dp=2), "lives in tensor parallelism"),
        (dict(bug="D", dp=2, dp_impl="ddp"), "grad_accum_steps >= 2"),
    ],
)
def test_a_bug_needs_its_mesh(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig(model="nano", global_batch_size=8, **fields)


def test_bugs_are_off_by_default() -> None:
    assert TrainConfig().bug is None


@pytest.fixture(scope="module")
def table():
    return evidence(investigate(progress=False))


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_each_bug_leaves_the_trace_the_lesson_teaches(table) -> None:
    by_bug = {SUSPECTS[name][0]: row for name, row in table.iterrows()}
    # Every suspect "trains fine": the loss ends where the reference's does (2 decimals).
    assert (abs(table["final loss"] - table["reference loss"]) < 0.01).all()
    a, b, c, d = (by_bug[k] for k in "ABCD")
    assert not a["ranks agree on the clip norm"] and a["max weight diff"] > 1e-3  # per stage
    assert b["layer norms / twin's"] == pytest.approx(1 / 4)  # divided by m=4 once more
    assert b["max weight diff"] < 1e-5  # clipping rescales it away: only the norms tell
    assert c["clip norm / reference's"] > 1.05 and c["max weight diff"] > 1e-3
    assert d["bytes per step / twin's"] == pytest.approx(2.0)  # 2 accumulation steps
    assert d["max weight diff"] < 1e-5  # the weights are right; the cost is not
    for row in (a, c, d):
        assert row["layer norms / twin's"] == pytest.approx(1.0, rel=1e-4)


def test_the_checker_confirms_only_the_right_cause() -> None:
    for name, (letter, _) in SUSPECTS.items():
        right = next(cause for cause, bug in CAUSES.items() if bug == letter)
        assert check(name, right).startswith("right")
        wrong = next(cause for cause, bug in CAUSES.items() if bug != letter)
        assert check(name, wrong).startswith("not")
    with pytest.raises(ValueError, match="not one of the choices"):
        check("suspect 1", "cosmic rays")
