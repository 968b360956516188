"""Notebook 10, the bug zoo: four runs that train fine, each with a seeded bug, and a checker.

``investigate()`` trains the one-process reference and the four suspects (``SUSPECTS``: the
mesh each bug lives in, with clipping on at every step), all with per-layer gradient norms, and
returns the evidence: for each suspect the oracle's verdict (the largest weight difference from
one process, and where), its clip norm against the reference's, whether its ranks agree on it,
and its per-layer pre-clip gradient norms and bytes per step against its *twin* (the same mesh
without the bug). ``check(suspect, cause)`` says whether a diagnosis is right, and why.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

import labkit
from labkit.bugs import BUGS
from labkit.config import TrainConfig
from labkit.launch import run_many

__all__ = ["CAUSES", "SUSPECTS", "check", "evidence", "investigate"]

# Every suspect trains the same model on the same batches; clipping bites at every step.
ZOO_RUN = dict(
    model="nano",
    steps=4,
    global_batch_size=8,
    clip="norm",
    max_norm=0.05,
    eval_every=0,
    layer_norms=True,
    progress=False,
)

# Suspect -> (bug letter, mesh). The learner sees the suspects' numbers, not the letters.
SUSPECTS: dict[str, tuple[str, dict[str, Any]]] = {
    "suspect 1": ("C", dict(tp=2)),
    "suspect 2": ("A", dict(pp=2, micro_batches=2)),
    "suspect 3": ("D", dict(dp=2, dp_impl="ddp", grad_accum_steps=2)),
    "suspect 4": ("B", dict(pp=2, micro_batches=4)),
}

# The diagnoses a learner chooses from (keys), and the bug each names.
CAUSES: dict[str, str] = {
    "clip norm not combined across pipeline stages": "A",
    "loss scaled twice in the pipeline": "B",
    "replicated parameters counted once per tensor-parallel rank in the clip norm": "C",
    "gradient accumulation syncs every micro-batch": "D",
    "the optimizer steps twice per batch": "",
    "data-parallel replicas see the same data": "",
}


def _configs(bugged: bool) -> list[TrainConfig]:
    return [
        TrainConfig(**ZOO_RUN, **mesh, bug=letter if bugged else None)
        for letter, mesh in SUSPECTS.values()
    ]


def investigate(progress: bool = True) -> dict[str, Any]:
    """Train the reference, the four suspects and their bug-free twins; return the runs:
    ``{"reference": RunResult, "suspects": {name: RunResult}, "twins": {name: RunResult}}``."""
    reference = labkit.run(**ZOO_RUN)
    runs = run_many(_configs(True) + _configs(False), progress=progress, desc="suspects")
    n = len(SUSPECTS)
    return {
        "reference": reference,
        "suspects": dict(zip(SUSPECTS, runs[:n], strict=True)),
        "twins": dict(zip(SUSPECTS, runs[n:], strict=True)),
    }


def evidence(runs: dict[str, Any]) -> pd.DataFrame:
    """One row per suspect: what the oracle, the per-layer norms and the bytes say."""
    ref = runs["reference"]
    ref_norm = float(ref.metrics.loc[ref.metrics["step"] == 0, "grad_norm"].iloc[0])
    rows = []
    for name, run in runs["suspects"].items():
        twin = runs["twins"][name]
        diff = ref.compare(run).set_index("name")["relative_difference"]

        def first_norms(r: labkit.RunResult) -> pd.Series:
            return r.layer_norms[r.layer_norms["step"] == 0].groupby("name")["grad_norm"].max()

        step0 = run.metrics[run.metrics["step"] == 0]
        rows.append(
            {
                "suspect": name,
                "mesh": run.config.label,
                "final loss": float(run.losses.iloc[-1]),
                "reference loss": float(ref.losses.iloc[-1]),
                "max weight diff": float(diff.max()),
                # Below 1e-5 the "worst" tensor is rounding noise: name none.
                "worst tensor": str(diff.idxmax()) if diff.max() > 1e-5 else "(none)",
                "clip norm / reference's": float(step0["grad_norm"].max()) / ref_norm,
                "ranks agree on the clip norm": bool(step0["grad_norm"].nunique() == 1),
                "layer norms / twin's": float((first_norms(run) / first_norms(twin)).median()),
                "bytes per step / twin's": float(run.metrics["comm_bytes"].median())
                / max(float(twin.metrics["comm_bytes"].median()), 1.0),
            }
        )
    return pd.DataFrame(rows).set_index("suspect")


def check(suspect: str, cause: str) -> str:
    """Whether ``cause`` (a key of ``CAUSES``) is what is wrong with ``suspect``, and why."""
    if suspect not in SUSPECTS:
        raise ValueError(f"suspect={suspect!r} is unknown: allowed: {', '.join(SUSPECTS)}")
    if cause not in CAUSES:
        raise ValueError(f"cause={cause!r} is not one of the choices: {', '.join(CAUSES)}")
    letter = SUSPECTS[suspect][0]
    bug = BUGS[letter]
    if CAUSES[cause] == letter:
        return f"right: {suspect}'s {bug.cause}. For real: {bug.history}."
    return f"not {suspect}: look again at its row of the evidence (the cause is not '{cause}')."
