"""Pipeline schedules as data: every order is complete, and its simulated bubble is its formula.

The simulator (free communication, forward 1, backward 2; a split backward B 1 + W 1) runs each
schedule's per-rank orders with their real dependencies, so a wrong order shows up as a wrong
bubble or a deadlock.
"""

from __future__ import annotations

import pytest

from labkit.lessons.pipeline import simulate_schedule, simulated_bubbles
from labkit.lessons.pipeline_timeline import peak_activations
from labkit.parallel.pp_orders import ORDERS, interleaved_1f1b_order, zb_h1_order

P, M = (2, 4, 8), (4, 8, 16)


def test_the_simulated_bubble_of_every_schedule_is_its_formula():
    table = simulated_bubbles(["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"], P, M)
    assert len(table) == 9 + 9 + 8 + 8  # interleaved needs p | m; zb-h1's formula needs m >= p
    worst = (table["simulated"] - table["formula"]).abs().max()
    assert worst < 1e-9, table
    # Interleaving (v = 2) and zero bubble both beat 1F1B at every p and m they share.
    by = table.set_index(["schedule", "p", "m"])["simulated"]
    for (name, p, m), bubble in by.items():
        if name in ("interleaved-1f1b", "zb-h1"):
            assert bubble < by[("1f1b", p, m)], (name, p, m)


@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("p", P)
def test_every_order_runs_each_action_exactly_once(name, p):
    m, v = 8, (2 if name == "interleaved-1f1b" else 1)
    for stage in range(p):
        order = ORDERS[name](m, stage, p, v)
        assert len(order) == len(set(order))
        kinds = {"F", "B", "W"} if name == "zb-h1" else {"F", "B"}
        for kind in kinds:
            done = sorted(a[1:] if len(a) == 3 else (a[1], 0) for a in order if a[0] == kind)
            assert done == sorted((i, c) for i in range(m) for c in range(v)), (kind, stage)


def test_zb_h1_keeps_1f1b_memory_and_interleaving_needs_whole_groups():
    tl = simulate_schedule("zb-h1", 8, 4)
    one = simulate_schedule("1f1b", 8, 4)
    # A micro-batch's activations live from its forward to its B (W needs only what B kept).
    zb = peak_activations(tl[tl["phase"] != "weight"])["peak"]
    assert (zb <= peak_activations(one)["peak"]).all()
    assert zb_h1_order(4, 0, 2)[-1][0] == "W"  # the held-back W passes close the step
    with pytest.raises(ValueError, match="multiple of pp=4"):
        interleaved_1f1b_order(6, 0, 4, 2)
