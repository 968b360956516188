"""Tests for notebook 01's clipping panel and the lesson helpers and figures it is built from.

No browser: the panel is driven by setting control values and calling ``update()``. Runs are
short nano runs (a second or two each).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import labkit  # noqa: E402
from labkit.clip import global_grad_norm  # noqa: E402
from labkit.data import load_corpus  # noqa: E402
from labkit.lessons.clipping import (  # noqa: E402
    adam_replay,
    compare_norm_and_value_clipping,
    deepnet_with_grads,
    held_out_gap,
    module_grad_norms,
    parameter_norm_table,
    spike_table,
    spiky_norms,
    summarize_runs,
    train_deepnet,
    value_for_norm,
)
from labkit.plots import figure_signature  # noqa: E402
from labkit.plots.clipping import (  # noqa: E402
    plot_adam_replay,
    plot_clip_direction_2d,
    plot_layer_norm_heatmap,
    plot_module_norms,
    plot_norm_vs_value,
    plot_runs,
    plot_spike,
)
from labkit.widgets.clipping import THRESHOLD_FIELDS, ClippingPanel  # noqa: E402

# nano + SGD at lr=2 diverges at step 10 without clipping (see the notebook); 12 steps show it.
STEPS = 12


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --- the panel ---------------------------------------------------------------------------------


def test_panel_trains_and_redraws_when_the_method_changes():
    panel = ClippingPanel(method="norm", threshold=1.0, lr=2.0, steps=STEPS)
    assert panel.figure is None and panel.result is None
    panel.update()
    clipped = panel.result
    assert clipped.config.clip == "norm" and clipped.config.max_norm == 1.0
    assert clipped.metrics["grad_norm_clipped"].max() <= 1.0 + 1e-4
    assert clipped.metrics["loss"].notna().all()
    assert not clipped.layer_norms.empty  # the heat map has data
    (shown,) = panel.output.outputs  # the panel's Output widget shows exactly the new figure
    assert shown["data"]["image/png"]
    first = figure_signature(panel.figure)

    panel.method.value = "none"
    panel.update()
    assert panel.result is not clipped and panel.result.config.clip == "none"
    assert panel.message.startswith("Diverged")  # lr=2 without clipping blows up
    assert figure_signature(panel.figure) != first
    assert panel.output.outputs[0]["data"]["image/png"] != shown["data"]["image/png"]


def test_panel_learning_rate_and_threshold_reach_the_run():
    panel = ClippingPanel(method="norm", steps=3)
    panel.lr.value = 0.1
    panel.threshold.value = 0.5
    panel.update()
    assert panel.result.config.lr == pytest.approx(0.1)
    assert panel.result.config.max_norm == pytest.approx(0.5)
    before = figure_signature(panel.figure)
    panel.threshold.value = 0.05
    panel.update()
    assert panel.result.metrics["grad_norm_clipped"].max() <= 0.05 + 1e-5
    assert figure_signature(panel.figure) != before


@pytest.mark.parametrize("method", list(THRESHOLD_FIELDS))
def test_threshold_slider_follows_the_method(method: str):
    panel = ClippingPanel(method="norm")
    panel.method.value = method
    field, usual = THRESHOLD_FIELDS[method]
    settings = panel.settings()
    assert settings["clip"] == method
    if field is None:
        assert panel.threshold.disabled
        assert not any(k in settings for k in ("max_norm", "clip_value", "zclip_z"))
    else:
        assert panel.threshold.description == field
        assert settings[field] == pytest.approx(usual, rel=1e-6)


def test_bad_setting_gives_a_message_not_an_exception():
    panel = ClippingPanel(method="norm", steps=2)
    panel.update()
    figure = panel.figure
    panel.method.value = "autoclip"
    panel.threshold.max = 3  # let the slider reach 10**3, beyond the percentile range (0, 100]
    panel.threshold.value = 500.0
    panel.update()  # must not raise
    assert panel.result is None
    assert panel.message.startswith("Not trained")
    assert "autoclip_percentile" in panel.message
    assert panel.figure is figure  # the last good figure stays


def test_replaced_figures_are_closed_in_pyplot():
    panel = ClippingPanel(method="norm", steps=2)
    panel.update()
    panel.update()
    # Both figures were handed to the Output and released from pyplot (no leak, no re-display).
    assert not plt.fignum_exists(panel.figure.number)


# --- lesson helpers ----------------------------------------------------------------------------


def test_module_grad_norms_combines_weight_and_bias():
    per_param = pd.DataFrame(
        {
            "step": [0, 0, 0, 1, 1, 1],
            "name": ["b.fc.weight", "b.fc.bias", "a.weight"] * 2,
            "grad_norm": [3.0, 4.0, 1.0, 6.0, 8.0, 2.0],
        }
    )
    out = module_grad_norms(per_param)
    assert list(out["module"]) == ["b.fc", "b.fc", "a", "a"]  # model order, not alphabetical
    assert list(out["grad_norm"]) == pytest.approx([5.0, 10.0, 1.0, 2.0])


def test_deepnet_gradients_explode_towards_the_input():
    net = deepnet_with_grads(seed=0)
    modules = module_grad_norms(parameter_norm_table(net)).set_index("module")["grad_norm"]
    assert modules["layers.0"] > 100 * modules["layers.23"]
    total = float(global_grad_norm(net.parameters()))
    assert total == pytest.approx(math.sqrt((modules**2).sum()), rel=1e-5)


def test_toy_deepnet_diverges_without_clipping_and_not_with_it():
    runs = {"none": train_deepnet(lr=0.1), "norm": train_deepnet(lr=0.1, max_norm=1.0)}
    table = summarize_runs(runs)
    assert not pd.isna(table.loc["none", "nonfinite_from"])
    assert table.loc["none", "skipped_steps"] > 0
    assert pd.isna(table.loc["norm", "nonfinite_from"])
    clipped = runs["norm"].metrics
    assert clipped["grad_norm_clipped"].max() <= 1.0 + 1e-4
    assert (clipped["grad_norm"] > 1.0).all()  # this network's norm is always far above 1
    assert set(runs["norm"].layer_norms.columns) == {"step", "rank", "name", "grad_norm"}


def test_norm_clipping_keeps_direction_value_clipping_turns_it():
    net = deepnet_with_grads(seed=0)
    before = [p.grad.clone() for p in net.parameters()]
    comparison = compare_norm_and_value_clipping(net, max_norm=1.0)
    assert comparison.cosine_norm == pytest.approx(1.0, abs=1e-9)
    assert comparison.cosine_value < 0.9
    # Both clipped to the same global norm, so only the direction differs.
    for column in ("norm", "value"):
        norm = math.sqrt((comparison.modules[column] ** 2).sum())
        assert norm == pytest.approx(1.0, rel=1e-4)
    for p, g in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)  # the model's gradients are left as they were


def test_value_for_norm_hits_the_target():
    grads = [torch.tensor([3.0, -0.1, 0.2]), torch.tensor([[5.0, 0.05]])]
    v = value_for_norm(grads, 1.0)
    clamped = torch.cat([g.reshape(-1).clamp(-v, v) for g in grads])
    assert float(clamped.norm()) == pytest.approx(1.0, rel=1e-6)
    assert value_for_norm(grads, 100.0) == pytest.approx(5.0)  # already small enough


def test_spike_passes_a_fixed_threshold_but_not_the_adaptive_clippers():
    norms = spiky_norms(steps=100, spike_at=70, spike_factor=8.0)
    table = spike_table(norms, max_norm=5.0)
    typical = table.loc[69, "pre_clip"]
    assert table.loc[70, "pre_clip"] > 6 * typical
    assert table.loc[70, "fixed"] == pytest.approx(table.loc[70, "pre_clip"], rel=1e-5)
    assert table.loc[70, "autoclip"] < 1.5 * typical
    assert table.loc[70, "zclip"] < 0.5 * table.loc[70, "pre_clip"]
    # After its warm-up, ZClip leaves the ordinary steps alone.
    ordinary = table.drop(index=70).loc[25:]
    assert ordinary["zclip"].to_numpy() == pytest.approx(ordinary["pre_clip"].to_numpy(), rel=1e-5)


def test_adamw_steps_about_lr_whatever_the_gradient_scale():
    """Notebook 01, section 4: scaling every gradient cancels out of AdamW's step."""
    norms = spiky_norms(steps=100, spike_at=70, spike_factor=30.0)
    plain = adam_replay(norms, lr=1e-3)
    scaled = adam_replay([0.01 * n for n in norms], lr=1e-3)
    assert list(plain.columns) == ["step", "grad_norm", "step_over_lr", "sqrt_v"]
    assert plain.loc[0, "step_over_lr"] == pytest.approx(1.0, rel=1e-4)  # Adam's first step: lr
    assert scaled["step_over_lr"].to_numpy() == pytest.approx(
        plain["step_over_lr"].to_numpy(), abs=1e-3
    )
    assert plain["step_over_lr"].max() <= 1.01  # never the spike's 30-fold step SGD would take
    assert scaled.loc[70, "sqrt_v"] == pytest.approx(0.01 * plain.loc[70, "sqrt_v"], rel=1e-4)


def test_clipping_keeps_a_spike_out_of_adamws_second_moment():
    norms = spiky_norms(steps=100, spike_at=70, spike_factor=30.0)
    plain, clipped = adam_replay(norms), adam_replay(norms, max_norm=1.0)
    assert clipped["grad_norm"].max() <= 1.0 + 1e-6
    assert plain.loc[70, "sqrt_v"] > 3 * plain.loc[69, "sqrt_v"]  # the spike inflates v ...
    assert clipped.loc[70, "sqrt_v"] < 1.2 * clipped.loc[69, "sqrt_v"]  # ... unless clipped
    # ... and the unclipped steps after the spike shrink, the clipped ones carry on.
    assert plain.loc[80, "step_over_lr"] < 0.6 * plain.loc[69, "step_over_lr"]
    assert clipped.loc[80, "step_over_lr"] > 0.9 * clipped.loc[69, "step_over_lr"]


def test_held_out_gap_scores_the_same_weights_on_both_texts():
    result = labkit.run(model="nano", steps=3, threads=1, progress=False)
    gap = held_out_gap(result, n_batches=2)
    assert list(gap.index) == ["training text", "held-out text"]
    assert list(gap.columns) == ["topics", "characters", "char_entropy", "loss"]
    corpus = load_corpus("pydoc")
    assert gap["characters"].sum() == len(corpus.train) + len(corpus.val)
    assert (gap["loss"] > 0).all() and (gap["char_entropy"] > 0).all()
    # The corpus is the pydoc topics in alphabetical order; the held-out text is its end.
    assert (
        gap.loc["training text", "topics"].split(" ... ")[1]
        == (gap.loc["held-out text", "topics"].split(" ... ")[0])
    )
    assert gap.loc["held-out text", "topics"].endswith("yield")


# --- figures -----------------------------------------------------------------------------------


def test_plot_runs_marks_a_divergence():
    runs = {"none": train_deepnet(lr=0.1, steps=40), "norm": train_deepnet(lr=0.1, max_norm=1.0)}
    fig = plot_runs(runs, title="toy")
    loss_ax = fig.axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert any("nan/inf from step" in label and label.startswith("none") for label in labels)
    assert not any(label.startswith("norm:") for label in labels)
    assert loss_ax.get_yscale() == "log"  # the values span many orders of magnitude


def test_plot_runs_linear_scale_and_validation_dots():
    runs = {"none": train_deepnet(lr=0.1, steps=40), "norm": train_deepnet(lr=0.1, max_norm=1.0)}
    fig = plot_runs(runs, scale="linear")
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "linear"]
    assert plot_runs(runs, scale="log").axes[1].get_yscale() == "log"
    with pytest.raises(ValueError, match="scale="):
        plot_runs(runs, scale="logarithmic")
    metrics = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "loss": [3.0, 2.5, 2.0],
            "val_loss": [float("nan"), float("nan"), 2.2],
            "grad_norm": [1.0, 1.0, 1.0],
            "grad_norm_clipped": [1.0, 1.0, 1.0],
        }
    )
    labels = [line.get_label() for line in plot_runs({"a": metrics}, validation=True).axes[0].lines]
    assert "a: validation" in labels
    assert "a: validation" not in [
        line.get_label() for line in plot_runs({"a": metrics}).axes[0].lines
    ]


def test_heatmap_has_one_row_per_module_and_greys_out_nonfinite():
    layer_norms = pd.DataFrame(
        {
            "step": [0, 0, 0, 1, 1, 1],
            "rank": 0,
            "name": ["a.weight", "a.bias", "b.weight"] * 2,
            "grad_norm": [1.0, 1.0, 2.0, float("nan"), 1.0, 1e6],
        }
    )
    fig = plot_layer_norm_heatmap(layer_norms)
    image = fig.axes[0].get_images()[0]
    data = image.get_array()
    assert data.shape == (2, 2)  # modules a, b x steps 0, 1
    assert bool(data.mask[0, 1]) and not bool(data.mask[1, 1])


def test_other_figures_draw_their_data():
    net = deepnet_with_grads(seed=0)
    modules = module_grad_norms(parameter_norm_table(net))
    figures = [
        plot_module_norms(modules),
        plot_clip_direction_2d(),
        plot_norm_vs_value(compare_norm_and_value_clipping(net)),
        plot_spike(spike_table(spiky_norms()), max_norm=5.0, spike_at=70),
        plot_adam_replay({"no clipping": adam_replay(spiky_norms())}, spike_at=70),
    ]
    signatures = {figure_signature(f) for f in figures}
    assert len(signatures) == len(figures)
    for fig in figures:
        assert all(ax.get_xlabel() for ax in fig.axes)
    assert plot_clip_direction_2d(grad=(1.0, 2.0)) is not None
    assert figure_signature(plot_clip_direction_2d(grad=(1.0, 2.0))) != figure_signature(figures[1])
