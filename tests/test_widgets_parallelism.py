"""Notebook 05 without a browser: the strategy planner, the formulas it draws, and the two
multi-process demonstrations checked against those formulas."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from labkit.lessons.parallelism import (  # noqa: E402
    comm_formula,
    measure_strategies,
    memory_formula,
    parameters_per_rank,
    plan,
    tp_comm_formula,
    tp_layer_check,
)
from labkit.model import GPT, count_params, model_config  # noqa: E402
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.parallelism import plot_matmul_split  # noqa: E402
from labkit.widgets.parallelism import StrategyPlanner  # noqa: E402

VOCAB = 103  # any vocabulary works for the formulas; passing it skips loading the corpus


def n_params(model: str) -> int:
    with torch.device("meta"):
        return count_params(GPT(model_config(model, vocab_size=VOCAB)))


# ---------------------------------------------------------------------------------------------
# The panel
# ---------------------------------------------------------------------------------------------


def test_planner_redraws_when_a_control_changes() -> None:
    panel = StrategyPlanner(model="micro", world_size=2)
    assert panel.figure is None and panel.result is None
    panel.update()
    first, signature = panel.figure, figure_signature(panel.figure)
    assert set(panel.result["strategy"]) == {"ddp", "zero1", "fsdp", "pp-gpipe", "tp"}
    assert (panel.result.groupby("strategy").size() == 2).all()
    assert list(panel.table["strategy"]) == ["DP", "ZeRO-1", "FSDP", "PP", "TP"]
    assert "micro, 2 ranks" in panel.message

    panel.world_size.value = 4  # observing the control redraws without a call to update()
    assert (panel.result.groupby("strategy").size() == 4).all()
    assert figure_signature(panel.figure) != signature
    assert not plt.fignum_exists(first.number)  # the replaced figure was closed
    # More ranks: DP holds as much as before, FSDP a quarter of it.
    dp = panel.result[panel.result["strategy"] == "ddp"]["total_bytes"]
    fsdp = panel.result[panel.result["strategy"] == "fsdp"]["total_bytes"]
    assert fsdp.to_numpy() == pytest.approx(dp.to_numpy() / 4)


def test_planner_precision_and_batch_change_what_it_shows() -> None:
    panel = StrategyPlanner(model="small", world_size=2)
    panel.update()
    fp32, signature = panel.result.copy(), figure_signature(panel.figure)
    panel.precision.value = "mixed"
    mixed = panel.result
    # Half-precision weights and gradients, 12 bytes of fp32 optimizer state per parameter.
    assert mixed["params_bytes"].to_numpy() == pytest.approx(fp32["params_bytes"].to_numpy() / 2)
    assert mixed["optimizer_bytes"].to_numpy() == pytest.approx(
        fp32["optimizer_bytes"].to_numpy() * 1.5
    )
    assert figure_signature(panel.figure) != signature

    tp_before = panel.result.query("strategy == 'tp'")["comm_bytes"].max()
    dp_before = panel.result.query("strategy == 'ddp'")["comm_bytes"].max()
    panel.batch.value = 4 * panel.batch.value
    # TP's traffic is activations (grows with the batch); DP's is gradients (does not).
    assert panel.result.query("strategy == 'tp'")["comm_bytes"].max() > 3 * tp_before
    assert panel.result.query("strategy == 'ddp'")["comm_bytes"].max() == dp_before


def test_planner_names_strategies_that_cannot_split_the_model() -> None:
    panel = StrategyPlanner(model="large", world_size=8)  # 12 heads: 8 ranks cannot share them
    panel.update()
    assert "Not possible here" in panel.message and "n_head=12" in panel.message
    assert "tp" not in set(panel.result["strategy"])
    assert "TP" not in set(panel.table["strategy"])

    panel.model.value = "nano"
    panel.world_size.value = 64  # 4 layers, 2 heads: neither PP nor TP
    assert "PP:" in panel.message and "TP:" in panel.message
    assert set(panel.result["strategy"]) == {"ddp", "zero1", "fsdp"}


def test_planner_reports_a_rejected_setting_instead_of_raising() -> None:
    panel = StrategyPlanner(model="nano", world_size=2)
    panel.update()
    panel.precision.options = ["fp32", "mixed", "fp8"]  # a choice the formulas do not know
    panel.precision.value = "fp8"
    assert panel.message.startswith("Cannot plan") and "fp8" in panel.message
    assert panel.result is None


# ---------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------


def test_memory_formula_follows_the_zero_paper_for_dp_zero1_and_fsdp() -> None:
    psi, n = n_params("micro"), 4
    frame = memory_formula("micro", n, vocab_size=VOCAB).set_index(["strategy", "rank"])
    assert frame.loc[("ddp", 0), "total_bytes"] == 16 * psi
    assert frame.loc[("zero1", 3), "total_bytes"] == pytest.approx((4 + 4 + 8 / n) * psi)
    assert frame.loc[("fsdp", 2), "total_bytes"] == pytest.approx(16 * psi / n)


def test_pp_stages_and_tp_shards_account_for_every_parameter() -> None:
    psi, n = n_params("medium"), 8
    counts = parameters_per_rank("medium", n, vocab_size=VOCAB)
    pp = counts[counts["strategy"] == "pp-gpipe"]["params"]
    assert len(pp) == n and pp.sum() == psi  # the stages partition the model
    tp = counts[counts["strategy"] == "tp"]["params"]
    # Each TP rank holds less than the model but more than 1/n of it (the replicated part).
    assert (tp < psi).all() and (tp > psi / n).all()
    # Replicated bytes are those TP does not split: embedding, norms, head, row biases.
    cfg = model_config("medium", vocab_size=VOCAB)
    d, L = cfg.d_model, cfg.n_layer
    sharded = L * (
        3 * (d * d) + 2 * d + d * d + 4 * d * d + 4 * d + 4 * d * d
    )  # q,k,v,proj,fc,proj
    assert tp.iloc[0] == pytest.approx(psi - sharded + sharded / n)


def test_comm_formula_per_strategy() -> None:
    psi, n, batch = n_params("micro"), 4, 8
    cfg = model_config("micro", vocab_size=VOCAB)
    activation = batch * cfg.block_size * cfg.d_model * 4
    frame = comm_formula("micro", n, batch, vocab_size=VOCAB).set_index(["strategy", "rank"])
    assert frame.loc[("ddp", 0), "comm_bytes"] == pytest.approx(2 * (n - 1) / n * 4 * psi)
    # The first and last stage send one way only; middle stages both ways.
    assert frame.loc[("pp-gpipe", 0), "comm_bytes"] == activation
    assert frame.loc[("pp-gpipe", 1), "comm_bytes"] == 2 * activation
    assert frame.loc[("pp-gpipe", n - 1), "comm_bytes"] == activation
    tp = tp_comm_formula("micro", n, batch, clip=False, vocab_size=VOCAB)
    assert tp == [int(4 * cfg.n_layer * 2 * (n - 1) / n * activation)] * n
    with_clip = tp_comm_formula("micro", n, batch, clip=True, vocab_size=VOCAB)
    # Clipping adds no broadcast any more: every tp slice clips its copy of the replicated
    # gradients by the same global norm (in which rank 0 alone counts them).
    assert with_clip == tp


def test_plan_rejects_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision='fp8'"):
        plan("nano", 2, precision="fp8", vocab_size=VOCAB)


def test_matmul_split_figure_changes_with_the_number_of_parts() -> None:
    x, w = torch.randn(4, 6), torch.randn(6, 6)
    two, three = plot_matmul_split(x, w, parts=2), plot_matmul_split(x, w, parts=3)
    assert figure_signature(two) != figure_signature(three)
    plt.close(two)
    plt.close(three)


# ---------------------------------------------------------------------------------------------
# The multi-process demonstrations, against the formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_column_then_row_parallel_equals_dense_with_one_all_reduce_each_way() -> None:
    check = tp_layer_check(world_size=2)
    assert all(check.checks.values()), check.checks
    events = check.events
    assert len(events) == 4  # 2 ranks x (g forward + f backward)
    assert set(zip(events["pass"], events["operator"])) == {("forward", "g"), ("backward", "f")}
    assert (events["bytes"] == 2 * 3 * 8 * 4).all()  # an activation, never a weight


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_measured_memory_and_bytes_match_the_formulas() -> None:
    measured = measure_strategies(model="nano", world_size=2, steps=2, progress=False)
    formula = plan("nano", 2, global_batch_size=8)
    both = measured.merge(formula, on=["strategy", "rank"], suffixes=("", "_formula"))
    assert len(both) == 10
    # Memory: within 1% (Adam's step counters, FSDP's padding, ZeRO-1's whole-tensor shards).
    ratio = both["total_bytes"] / both["total_bytes_formula"]
    assert ratio.between(0.99, 1.01).all(), both[["strategy", "rank", "total_bytes"]]
    # Bytes: every strategy's counter is exactly what the formula says a rank sends...
    assert (both["comm_bytes"] == both["comm_bytes_formula"]).all(), both
    # ...and the measured messages (profiler), times the ring's factor, agree with it (to the
    # loss's few bytes) wherever Gloo runs the collective asked for. FSDP asks for reduce-
    # scatters, which Gloo runs as all-reduces of the whole gradient: the rest of FSDP's plan
    # plus one full all-reduce of the gradients instead of half of one.
    by = both.set_index("strategy")
    ratio = by["wire_bytes"] / by["comm_bytes"]
    assert ratio.drop("fsdp").between(1.0, 1.002).all(), ratio
    grads = by.loc["ddp", "comm_bytes"].iloc[0]  # a ring all-reduce of the gradients, N = 2
    fsdp = by.loc["fsdp"]
    assert (fsdp["wire_bytes"] - fsdp["comm_bytes"]).between(grads / 2, grads / 2 + 1024).all()
    # And every strategy trained the same model (the equivalence invariant).
    assert measured["loss"].max() - measured["loss"].min() < 1e-4
