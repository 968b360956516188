"""Reading a pipeline's measured timeline: the bubble, and how many activations a stage holds.

``bubble_fraction`` compares each stage's idle time with the theory ``(p - 1) / (m + p - 1)``;
``peak_activations`` counts the micro-batches whose forward had finished but whose backward had
not (GPipe: ``m``; 1F1B: at most ``p - stage``). Both take the ``timeline`` DataFrame of a
``RunResult`` (or a simulated one in the same columns).
"""

from __future__ import annotations

import pandas as pd

__all__ = ["PIPELINE_PHASES", "bubble_fraction", "peak_activations"]

PIPELINE_PHASES = ("forward", "backward", "weight", "send", "recv")
COMPUTE_PHASES = ("forward", "backward", "weight")  # "weight": a split-off W pass


def _steady(timeline: pd.DataFrame, skip_steps: int) -> pd.DataFrame:
    """Pipeline events of the steps after the first ``skip_steps`` (all if there are no others)."""
    tl = timeline[timeline["phase"].isin(PIPELINE_PHASES)]
    steps = sorted(tl["step"].unique())
    keep = steps[skip_steps:] if len(steps) > skip_steps else steps
    return tl[tl["step"].isin(keep)]


def _micro_batches_per_step(tl: pd.DataFrame) -> int:
    forwards = tl[tl["phase"] == "forward"].groupby(["rank", "step"]).size()
    return int(forwards.max()) if len(forwards) else 0


def bubble_fraction(
    timeline: pd.DataFrame,
    micro_batches: int | None = None,
    skip_steps: int = 1,
    per_step: bool = False,
) -> pd.DataFrame:
    """Measured idle fraction of each stage against the theory ``(p - 1) / (m + p - 1)``.

    For each step, the *step time* is the pipeline's span: from the first forward to start (on
    stage 0) to the last backward to end (on stage 0 too). A rank's *busy* time is the sum of
    its forward and backward events; idle = step time - busy, which includes waiting in recv
    and the cost of posting sends. Steps after the first ``skip_steps`` count (the first step
    pays one-off costs). ``micro_batches`` is m, the micro-batches per pipeline flush; by
    default the forwards per rank per step (pass it when ``grad_accum_steps > 1``). The theory
    assumes equal stages and free communication, so compare balanced runs.

    Returns one row per rank (``per_step=True``: per rank and step) with ``busy_s, step_s,
    bubble, theory``.
    """
    tl = _steady(timeline, skip_steps)
    compute = tl[tl["phase"].isin(COMPUTE_PHASES)]
    if compute.empty:
        raise ValueError("the timeline holds no forward/backward events")
    p = int(compute["rank"].nunique())
    m = micro_batches or _micro_batches_per_step(compute)
    window = compute.groupby("step").agg(start=("start_s", "min"), end=("end_s", "max"))
    step_s = window["end"] - window["start"]
    busy = (compute["end_s"] - compute["start_s"]).groupby([compute["rank"], compute["step"]]).sum()
    out = busy.rename("busy_s").reset_index()
    out["step_s"] = out["step"].map(step_s)
    if not per_step:
        out = out.groupby("rank")[["busy_s", "step_s"]].sum().reset_index()
    out["bubble"] = 1.0 - out["busy_s"] / out["step_s"]
    out["theory"] = (p - 1) / (m + p - 1)
    return out.set_index(["rank", "step"] if per_step else "rank")


def peak_activations(timeline: pd.DataFrame) -> pd.DataFrame:
    """Per rank: the most micro-batches whose forward had finished but whose backward had not.

    That is how many micro-batches' activations a stage holds at once. Returns one row per rank:
    ``peak`` (measured, max over steps), ``gpipe`` (= m) and ``one_f_one_b`` (= min(m, p - stage)).
    """
    tl = timeline[timeline["phase"].isin(("forward", "backward"))]
    if tl.empty:
        raise ValueError("the timeline holds no forward/backward events")
    p = int(tl["rank"].nunique())
    m = _micro_batches_per_step(tl)
    rows = []
    for rank, events in tl.groupby("rank"):
        peak = 0
        for _, g in events.groupby("step"):
            alive = 0
            # A forward keeps its activations from its end; a backward frees them at its end.
            for phase in g.sort_values("end_s")["phase"]:
                alive += 1 if phase == "forward" else -1
                peak = max(peak, alive)
        rows.append({"rank": rank, "peak": peak, "gpipe": m, "one_f_one_b": min(m, p - int(rank))})
    return pd.DataFrame(rows).set_index("rank")
