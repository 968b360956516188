"""Notebook 02's warm-up experiment over seeds: the table, its summaries, and the headline itself.

The headline (post-LN without warm-up ends far behind post-LN with it, pre-LN much less so) is
checked on real runs with the notebook's settings, on two of the tuning seeds; the rest uses
tiny runs or hand-made tables.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labkit.lessons.schedules import (  # noqa: E402
    CONFIRM_SEEDS,
    MUCH_WORSE,
    TUNING_SEEDS,
    WARMUP_EXPERIMENT,
    WARMUP_STEPS,
    describe_headline,
    schedule_experiment,
    schedule_spread,
    schedule_verdict,
    warmup_experiment,
    warmup_gaps,
    warmup_headline,
    warmup_spread,
)
from labkit.plots.schedules import plot_seed_spread, plot_warmup_grid  # noqa: E402

TINY = {"model": "nano", "block_size": 16, "global_batch_size": 4, "steps": 6, "eval_every": 3}


def _table(gaps: dict[str, list[float]], base: float = 3.0) -> pd.DataFrame:
    """A warm-up table by hand: with warm-up every run ends at ``base``, without it ``base+gap``."""
    rows = []
    for norm, per_seed in gaps.items():
        for seed, gap in enumerate(per_seed):
            for label, loss in (("none", base + gap), ("warm", base)):
                rows.append(
                    {
                        "norm": norm,
                        "warm-up": label,
                        "seed": seed,
                        "validation loss": loss,
                        "status": "trains",
                    }
                )
    return pd.DataFrame(rows)


def test_tuning_and_confirmation_seeds_do_not_overlap() -> None:
    assert len(TUNING_SEEDS) == len(CONFIRM_SEEDS) == 5
    assert not set(TUNING_SEEDS) & set(CONFIRM_SEEDS)
    assert WARMUP_EXPERIMENT["clip"] == "none"  # clipping would hide the effect
    assert 0 < WARMUP_STEPS < WARMUP_EXPERIMENT["steps"]


def test_one_row_per_norm_warmup_and_seed() -> None:
    runs: dict = {}
    table = warmup_experiment(
        (3, 1),
        warmups={"none": {}, "warm-up 3": {"warmup_steps": 3}},
        runs=runs,
        progress=False,
        **TINY,
    )
    keys = list(zip(table["norm"], table["warm-up"], table["seed"], strict=True))
    assert keys == [
        (norm, label, seed)
        for norm in ("pre", "post")
        for label in ("none", "warm-up 3")
        for seed in (3, 1)
    ]
    assert list(runs) == keys  # the kept RunResults, under the same keys
    for column in (
        "train loss (last 20 steps)",
        "validation loss",
        "max train loss",
        "status",
        "diverged",
        "warmup length",
        "max lr",
    ):
        assert column in table, column
    assert table["validation loss"].notna().all()
    assert set(table["status"]) <= {"trains", "stalled", "diverged"}
    assert (table["diverged"] == (table["status"] == "diverged")).all()
    assert runs[("post", "none", 3)].config.norm == "post"
    assert runs[("pre", "none", 1)].config.seed == 1
    assert runs[("pre", "warm-up 3", 3)].metrics["lr"].iloc[0] == 0.0  # warm-up starts at 0
    assert table.loc[table["warm-up"] == "warm-up 3", "warmup length"].eq(3.0).all()
    # Different seeds are different runs; the same seed is the same run.
    pre_none = table[(table["norm"] == "pre") & (table["warm-up"] == "none")]
    assert pre_none["validation loss"].nunique() == 2
    fig = plot_warmup_grid(runs, seed=1)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["pre-LN GPT", "post-LN GPT"]
    assert len(fig.axes[0].get_lines()) == 4  # two runs (raw and smoothed) of seed 1 only
    plt.close(fig)
    fig = plot_seed_spread({"a": table, "b": table}, by=["norm", "warm-up"], plateau=3.2)
    assert len(fig.axes) == 2 and fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][0] == "pre\nnone"
    plt.close(fig)


def test_headline_counts_seeds_per_norm() -> None:
    table = _table({"pre": [0.1, 0.6, 0.0, 0.2, -0.1], "post": [0.9, 1.0, 0.2, 0.8, 0.7]})
    gaps = warmup_gaps(table)
    assert list(gaps.columns) == ["pre", "post"]
    assert gaps["post"].tolist() == pytest.approx([0.9, 1.0, 0.2, 0.8, 0.7])
    h = warmup_headline(table)
    assert h["seeds"] == 5 and h["much worse"] == {"pre": 1, "post": 4}
    assert h["holds"]  # 4 of 5 for post-LN, 1 of 5 for pre-LN
    assert not warmup_headline(table, much_worse=0.75)["holds"]  # post: only 3 of 5 above 0.75
    text = describe_headline(table)
    assert "post-LN" in text and "in 4 of 5 seeds" in text and "+0.20 to +1.00" in text
    worse = _table({"pre": [0.6, 0.6, 0.0, 0.0, 0.0], "post": [1.0] * 5})
    assert not warmup_headline(worse)["holds"]  # pre-LN lost as much in 2 seeds
    spread = warmup_spread(table)
    assert spread.loc[("post", "none"), "max"] == pytest.approx(4.0)
    assert spread.loc[("post", "warm"), "std"] == 0.0 and (spread["seeds"] == 5).all()


def test_the_headline_holds_on_two_tuning_seeds() -> None:
    """The lesson's claim, on real runs with the notebook's settings (8 runs, a few seconds)."""
    table = warmup_experiment((0, 4), progress=False)
    gaps = warmup_gaps(table)
    assert (gaps["post"] > MUCH_WORSE).all(), gaps  # post-LN fails without warm-up ...
    assert (gaps["pre"] < MUCH_WORSE).all(), gaps  # ... pre-LN loses much less
    post = table[table["norm"] == "post"].set_index("warm-up")
    assert (post.loc["no warm-up", "status"] == "stalled").all()  # on the unigram plateau
    assert (post.loc[f"warm-up {WARMUP_STEPS}", "status"] == "trains").all()
    assert not table["diverged"].any()


def test_schedule_verdict_sets_the_gap_against_the_noise() -> None:
    runs: dict = {}
    table = schedule_experiment(
        {"cosine": {"schedule": "cosine"}, "wsd": {"schedule": "wsd"}},
        (0, 1),
        runs=runs,
        progress=False,
        **dict(TINY, steps=10, warmup_steps=2, eval_every=5),
    )
    assert list(zip(table["schedule"], table["seed"], strict=True)) == [
        ("cosine", 0),
        ("cosine", 1),
        ("wsd", 0),
        ("wsd", 1),
    ]
    assert list(runs) == [("cosine", 0), ("cosine", 1), ("wsd", 0), ("wsd", 1)]
    assert table["validation loss at 80%"].notna().all()
    by_hand = pd.DataFrame(
        {
            "schedule": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
            "seed": [0, 1, 2] * 3,
            "validation loss": [2.0, 2.1, 2.2, 1.9, 2.0, 2.1, 2.1, 2.0, 2.2],
        }
    )
    spread = schedule_spread(by_hand)
    assert spread.loc["b", "minus a: mean"] == pytest.approx(-0.1)
    assert spread.loc["a", "mean"] == pytest.approx(2.1)
    lines = schedule_verdict(by_hand).splitlines()
    assert len(lines) == 3
    assert "lower than a in every seed" in lines[1]
    assert "within the noise" in lines[2]  # c is above a in one seed and below in another
