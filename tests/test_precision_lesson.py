"""Notebook 08's helpers: fp16's range against torch's own casts, the trace reader on a real
profile, the loss-scale panel, and the experiments' tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import labkit
from labkit.lessons.precision import (
    fp16_fate,
    gradient_magnitudes,
    memory_breakdown,
    precision_experiment,
    recompute_experiment,
)
from labkit.lessons.trace import last_step, op_kind, trace_ops
from labkit.plots.common import figure_signature
from labkit.plots.precision import plot_precision_runs, plot_trace
from labkit.widgets.precision import ScalerPanel


@pytest.mark.parametrize("scale", [1.0, 2.0**10, 2.0**30])
def test_fp16_fate_is_what_torch_does_when_it_casts(scale):
    values = np.logspace(-12, 2, 4001)
    fate = fp16_fate(values, scale)
    half = torch.tensor(values * scale, dtype=torch.float64).half()
    assert fate["flushed_to_zero"] == pytest.approx(float((half == 0).double().mean()), abs=1e-3)
    assert fate["overflow"] == pytest.approx(float(half.isinf().double().mean()), abs=1e-3)
    subnormal = (half != 0) & (half.abs() < torch.finfo(torch.float16).tiny)
    assert fate["subnormal"] == pytest.approx(float(subnormal.double().mean()), abs=1e-3)
    assert sum(fate.values()) == pytest.approx(1.0)


def test_gradients_of_a_real_backward_pass_and_the_scale_that_saves_them():
    g = gradient_magnitudes("nano")
    assert (g > 0).all() and len(g) > 10_000
    assert fp16_fate(g, 1.0)["subnormal"] > 0.01  # fp16 rounds these coarsely at scale 1
    assert fp16_fate(g, 2.0**16)["normal"] == 1.0  # GradScaler's starting scale keeps them
    panel = ScalerPanel(g, log2_scale=0)
    panel.update()
    first = figure_signature(panel.figure)
    panel.scale.value = 40  # observed: redraws by itself
    assert figure_signature(panel.figure) != first
    assert "would skip the step" in panel.message and panel.fate["overflow"] > 0.5


def test_trace_ops_reads_the_top_level_operations_of_a_real_trace(tmp_path):
    run = labkit.run(
        model="nano", steps=3, global_batch_size=4, progress=False, profile=True,
        trace_dir=str(tmp_path),
    )  # fmt: skip
    ops = trace_ops(run.trace_files[0])
    assert {"matmul", "optimizer"} <= set(ops["kind"])
    for _, lane in ops.groupby("thread"):  # top-level: no two overlap on one thread
        ends = (lane["start_ms"] + lane["dur_ms"]).to_numpy()[:-1]
        assert (lane["start_ms"].to_numpy()[1:] >= ends - 1e-6).all()
    step = last_step(ops)
    assert 0 < len(step) < len(ops) and step["start_ms"].min() >= 0
    assert op_kind("gloo:all_reduce") == "communication"
    assert op_kind("autograd::engine::evaluate_function: MmBackward0") == "matmul"
    assert plot_trace(step) is not None


def test_the_experiments_tables():
    few = dict(model="nano", steps=3, global_batch_size=4)
    runs, table = precision_experiment(("fp32", "bf16"), seeds=(0, 1), **few)
    assert set(runs) == {("fp32", 0), ("fp32", 1), ("bf16", 0), ("bf16", 1)}
    assert np.isfinite(table[["final_loss_mean", "step_ms"]].to_numpy()).all()
    assert (table["final_loss_min"] <= table["final_loss_max"]).all()
    assert figure_signature(plot_precision_runs(runs))
    rc = recompute_experiment(("none", "full"), **few)
    assert rc.loc["full", "activations_bytes"] < rc.loc["none", "activations_bytes"]
    assert rc.loc["full", "max_rel_diff"] <= 1e-6
    table = memory_breakdown(runs[("fp32", 0)]).set_index("category")
    assert table.loc["grads", "measured_bytes"] == table.loc["grads", "formula_bytes"]
