"""Tests for labkit.clip and the clipping exercise checker (single process, tiny tensors)."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from labkit.clip import (
    CLIP_METHODS,
    AutoClip,
    ZClip,
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_value_,
    global_grad_norm,
    grad_cosine,
    make_clipper,
    per_layer_grad_norms,
    snapshot_grads,
)
from labkit.exercises.clipping import check_global_norm_clip, reference_global_norm_clip

INF = math.inf
SHAPES = [(4, 3), (5,), (2, 2, 3), (7,), (1,)]


def make_params(seed: int = 0, grad_scale: float = 10.0, none_at: int | None = 1) -> list:
    """Parameters with deterministic gradients; the one at ``none_at`` has grad None."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    for i, p in enumerate(params):
        if i != none_at:
            p.grad = torch.randn(p.shape, generator=gen) * grad_scale
    return params


def assert_same_grads(a: list, b: list) -> None:
    """Bitwise-equal gradients (None where the other is None)."""
    for x, y in zip(a, b, strict=True):
        assert (x.grad is None) == (y.grad is None)
        if x.grad is not None:
            assert torch.equal(x.grad, y.grad)


# --- clip_grad_norm_ is torch's, bit for bit --------------------------------------------------


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, INF])
@pytest.mark.parametrize("foreach", [True, False, None])
@pytest.mark.parametrize("grad_scale", [10.0, 0.01], ids=["clips", "no-clip"])
def test_clip_grad_norm_equals_torch(norm_type: float, foreach: bool | None, grad_scale: float):
    ours, theirs = make_params(grad_scale=grad_scale), make_params(grad_scale=grad_scale)
    before = global_grad_norm(ours, norm_type)
    n_ours = clip_grad_norm_(ours, 1.0, norm_type, foreach=foreach)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, foreach=foreach)
    assert torch.equal(n_ours, n_theirs)
    assert torch.equal(n_ours, before)  # the returned norm is the one *before* clipping
    assert_same_grads(ours, theirs)
    after = float(global_grad_norm(ours, norm_type))
    if grad_scale > 1:
        assert after == pytest.approx(1.0, rel=1e-5)
    else:
        assert after == pytest.approx(float(before), rel=1e-6)


def test_single_tensor_and_mixed_dtypes_equal_torch():
    ours, theirs = make_params(none_at=None), make_params(none_at=None)
    for params in (ours, theirs):  # a float64 gradient makes a second (device, dtype) group
        params[2].data = params[2].data.double()
        params[2].grad = params[2].grad.double()
    assert torch.equal(clip_grad_norm_(ours, 2.0), torch.nn.utils.clip_grad_norm_(theirs, 2.0))
    assert_same_grads(ours, theirs)

    one, other = make_params()[0], make_params()[0]
    assert torch.equal(clip_grad_norm_(one, 0.5), torch.nn.utils.clip_grad_norm_(other, 0.5))
    assert torch.equal(one.grad, other.grad)


def test_no_grads_returns_zero_like_torch():
    params = [nn.Parameter(torch.ones(3))]
    norm = clip_grad_norm_(params, 1.0)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert float(norm) == 0.0


def test_error_if_nonfinite():
    ours, theirs = make_params(), make_params()
    for params in (ours, theirs):
        params[0].grad[0, 0] = math.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert torch.isinf(ours[0].grad[0, 0])  # nothing was scaled before raising
    # Without the flag, behave as torch: scale by the non-finite norm anyway.
    n_ours = clip_grad_norm_(ours, 1.0)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isinf(float(n_ours)) and math.isinf(float(n_theirs))
    for x, y in zip(ours, theirs, strict=True):
        if x.grad is not None:
            torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0, equal_nan=True)


def test_foreach_true_on_unsupported_device_raises_like_torch():
    p = nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        clip_grad_norm_([p], 1.0, foreach=True)
    with pytest.raises(RuntimeError, match="foreach=True"):
        torch.nn.utils.clip_grad_norm_([p], 1.0, foreach=True)


def test_group_world_without_process_group_is_single_process():
    assert dist.group.WORLD is None  # no process group in this test process
    ours, theirs = make_params(), make_params()
    n = clip_grad_norm_(ours, 1.0, group=dist.group.WORLD)
    assert torch.equal(n, torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert_same_grads(ours, theirs)


@pytest.fixture
def world_of_one():
    """An in-process Gloo group of size 1, to exercise the all_reduce path cheaply."""
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, INF])
def test_group_of_one_matches_torch(world_of_one, norm_type: float):
    for group in (world_of_one, [world_of_one]):
        ours, theirs = make_params(), make_params()
        n_ours = clip_grad_norm_(ours, 1.0, norm_type, group=group)
        n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
        assert n_ours.dtype == n_theirs.dtype
        torch.testing.assert_close(n_ours, n_theirs, rtol=1e-6, atol=0)
        for x, y in zip(ours, theirs, strict=True):
            if x.grad is not None:
                torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=0)
    # An empty shard still joins the collective and gets a (zero) norm back.
    assert float(clip_grad_norm_([], 1.0, group=world_of_one)) == 0.0


# --- clip_grad_value_ and AGC ----------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False])
def test_clip_grad_value_equals_torch(foreach: bool):
    ours, theirs = make_params(grad_scale=3.0), make_params(grad_scale=3.0)
    clip_grad_value_(ours, 1.5, foreach=foreach)
    torch.nn.utils.clip_grad_value_(theirs, 1.5, foreach=foreach)
    assert_same_grads(ours, theirs)
    assert max(float(p.grad.abs().max()) for p in ours if p.grad is not None) == 1.5


def agc_by_the_paper(weight: torch.Tensor, grad: torch.Tensor, clip_factor: float, eps: float):
    """AGC written unit by unit with Python loops, straight from Brock et al. 2021 (eq. 3)."""
    out = grad.clone()
    units = [slice(None)] if weight.ndim <= 1 else range(weight.shape[0])
    for i in units:
        w_norm = math.sqrt(float((weight[i].double() ** 2).sum()))
        g_norm = math.sqrt(float((grad[i].double() ** 2).sum()))
        limit = clip_factor * max(w_norm, eps)
        if g_norm > limit:
            out[i] = grad[i] * (limit / g_norm)
    return out


def test_adaptive_clip_grad_matches_the_paper():
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 3, 2, 2), (5, 4), (5,), (4,)]  # conv, linear, bias, zero bias
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params[3].data.zero_()  # eps decides its limit
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.05
    params[0].grad[:3] *= 100  # some units far over the limit, the others under it
    params[1].grad[1] *= 100
    params.append(nn.Parameter(torch.ones(2)))  # grad None: skipped

    originals = snapshot_grads(params)
    expected = [agc_by_the_paper(p.detach(), p.grad, 0.05, 1e-3) for p in params[:4]]
    # The fixture must have both kinds of unit, or the comparison below proves little.
    unit_changed = [
        not torch.equal(e[i], o[i])
        for e, o in zip(expected[:2], originals[:2], strict=True)
        for i in range(5)
    ]
    assert any(unit_changed) and not all(unit_changed)

    norm_before = global_grad_norm(params)
    returned = adaptive_clip_grad_(params, clip_factor=0.05, eps=1e-3)

    assert torch.equal(returned, norm_before)
    for p, e in zip(params[:4], expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    assert params[4].grad is None


def test_adaptive_clip_grad_clips_only_units_over_the_limit():
    w = nn.Parameter(torch.ones(3, 4))  # unit norm 2, limit 0.02 * 2 = 0.04
    w.grad = torch.tensor([[0.01] * 4, [1.0] * 4, [0.0] * 4])  # unit norms 0.02, 2, 0
    adaptive_clip_grad_([w], clip_factor=0.02)
    assert torch.equal(w.grad[0], torch.full((4,), 0.01))  # under the limit: untouched
    assert float(w.grad[1].norm()) == pytest.approx(0.04, rel=1e-6)  # clipped to the limit
    assert torch.equal(w.grad[2], torch.zeros(4))  # zero gradient stays zero (no nan)


# --- AutoClip and ZClip on a made-up norm sequence ---------------------------------------------


def drive(clipper, norms: list[float]) -> list[float]:
    """Feed a single parameter whose gradient has each given norm; return the clipped norms."""
    p = nn.Parameter(torch.zeros(4))
    direction = torch.tensor([0.5, -0.5, 0.5, 0.5])  # unit vector
    out = []
    for n in norms:
        p.grad = direction * n
        returned = clipper([p])
        assert float(returned) == pytest.approx(n, rel=1e-6)  # pre-clip norm is returned
        out.append(float(p.grad.norm()))
    return out


def roundtrip(state: dict) -> dict:
    """Save and load through torch.save, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# Slowly decreasing norms (each one the smallest so far, so never over a percentile) with spikes.
AUTOCLIP_NORMS = [2.0 - 0.05 * i for i in range(12)]
AUTOCLIP_NORMS[6] = 10.0
AUTOCLIP_NORMS[10] = 8.0


def test_autoclip_clips_the_spike_only():
    clipped = drive(AutoClip(percentile=10.0), AUTOCLIP_NORMS)
    for i, (raw, out) in enumerate(zip(AUTOCLIP_NORMS, clipped, strict=True)):
        if i in (6, 10):
            history = AUTOCLIP_NORMS[: i + 1]
            assert out == pytest.approx(np.percentile(history, 10.0), rel=1e-5)
            assert out < raw / 4
        else:
            assert out == pytest.approx(raw, rel=1e-5)


def test_autoclip_history_window_and_nonfinite():
    clipper = AutoClip(percentile=50.0, history=3)
    drive(clipper, [1.0, 2.0, 3.0, 4.0])
    assert clipper.history == pytest.approx([2.0, 3.0, 4.0], rel=1e-6)  # pre-clip norms
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([math.inf, 1.0])
    history = list(clipper.history)
    clipper([p])
    assert clipper.history == history  # an inf norm is not recorded...
    assert torch.equal(p.grad, torch.tensor([math.inf, 1.0]))  # ...nor clipped


@pytest.mark.parametrize("resume_at", [3, 8])
def test_autoclip_resumes_exactly(resume_at: int):
    uninterrupted = AutoClip(percentile=10.0)
    drive(uninterrupted, AUTOCLIP_NORMS[:resume_at])
    resumed = AutoClip(percentile=10.0)
    resumed.load_state_dict(roundtrip(uninterrupted.state_dict()))
    rest = AUTOCLIP_NORMS[resume_at:]
    assert drive(resumed, rest) == drive(uninterrupted, rest)
    # Without the state the decisions differ (so the comparison above means something).
    assert drive(AutoClip(percentile=10.0), rest) != drive(copy.deepcopy(resumed), rest)


# ZClip: 10 warm-up norms around 1.0, then ordinary steps with spikes at 14 and 20.
ZCLIP_NORMS = [1.0 + 0.05 * math.sin(1.7 * i) for i in range(26)]
ZCLIP_NORMS[14] = 5.0
ZCLIP_NORMS[20] = 3.0
SPIKES = (14, 20)


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_zclip_clips_spikes_to_the_paper_threshold(mode: str):
    clipper = ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10, mode=mode)
    p = nn.Parameter(torch.zeros(1))
    for i, raw in enumerate(ZCLIP_NORMS):
        mean, var = clipper.mean, clipper.var  # statistics the decision is based on
        p.grad = torch.tensor([raw])
        clipper([p])
        out = float(p.grad.norm())
        if i < 10 or i not in SPIKES:
            assert out == float(torch.tensor(raw)), f"step {i} should not be clipped"
            continue
        sigma = math.sqrt(var)
        z = (raw - mean) / sigma
        assert z > 2.5
        expected = mean + (2.5**2 / z) * sigma if mode == "zscore" else mean + 2.5 * sigma
        assert out == pytest.approx(expected, rel=1e-5)
        assert out < mean + 2.5 * sigma + 1e-9  # never above the detection limit


def test_zclip_updates_its_mean_with_the_clipped_norm():
    clipper = ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10)
    drive(clipper, ZCLIP_NORMS[:14])
    mean_before = clipper.mean
    clipped = drive(clipper, [ZCLIP_NORMS[14]])[0]
    assert clipper.mean == pytest.approx(0.9 * mean_before + 0.1 * clipped, rel=1e-5)


def test_zclip_max_norm_clips_during_warmup():
    clipped = drive(ZClip(warmup_steps=5, max_norm=0.5), [1.0, 0.2, 3.0])
    assert clipped == pytest.approx([0.5, 0.2, 0.5], rel=1e-5)


@pytest.mark.parametrize("resume_at", [4, 12, 15])
def test_zclip_resumes_exactly(resume_at: int):
    def new() -> ZClip:
        return ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10)

    uninterrupted = new()
    drive(uninterrupted, ZCLIP_NORMS[:resume_at])
    resumed = new()
    resumed.load_state_dict(roundtrip(uninterrupted.state_dict()))
    rest = ZCLIP_NORMS[resume_at:]
    assert drive(resumed, rest) == drive(uninterrupted, rest)
    assert drive(new(), rest) != drive(copy.deepcopy(resumed), rest)


# --- make_clipper ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_make_clipper_returns_the_pre_clip_norm(method: str):
    params = make_params(grad_scale=5.0)
    expected = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    clipper = make_clipper(method, max_norm=1.0, clip_value=0.5)
    norm = clipper(params)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    after = float(global_grad_norm(params))
    if method in ("norm", "value", "agc"):
        assert after < 0.9 * float(expected)  # these clip gradients this large
    else:  # "none"; and the adaptive ones never clip their first step
        assert after == pytest.approx(float(expected), rel=1e-6)
    fresh = make_clipper(method, max_norm=1.0, clip_value=0.5)
    fresh.load_state_dict(roundtrip(clipper.state_dict()))
    assert fresh.state_dict() == clipper.state_dict()


def test_make_clipper_value_and_norm_do_what_they_say():
    params = make_params(grad_scale=5.0)
    make_clipper("value", clip_value=0.25)(params)
    assert max(float(p.grad.abs().max()) for p in params if p.grad is not None) == 0.25
    params = make_params(grad_scale=5.0)
    make_clipper("norm", max_norm=0.75, norm_type=INF)(params)
    assert float(global_grad_norm(params, INF)) == pytest.approx(0.75, rel=1e-5)


def test_load_state_dict_from_another_method_is_refused():
    with pytest.raises(ValueError, match="autoclip"):
        make_clipper("zclip").load_state_dict(make_clipper("autoclip").state_dict())
    with pytest.raises(ValueError, match="norm"):
        make_clipper("value").load_state_dict(make_clipper("norm").state_dict())


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"method": "bogus"}, "method", "zclip"),
        ({"method": "norm", "max_norm": 0.0}, "max_norm", "0.0"),
        ({"method": "norm", "max_norm": -1}, "max_norm", "-1"),
        ({"method": "value", "clip_value": -0.5}, "clip_value", "-0.5"),
        ({"method": "agc", "agc_clip_factor": 0}, "agc_clip_factor", "0"),
        ({"method": "autoclip", "autoclip_percentile": 0}, "autoclip_percentile", "(0, 100]"),
        ({"method": "autoclip", "autoclip_percentile": 101}, "autoclip_percentile", "101"),
        ({"method": "zclip", "zclip_z": -2.0}, "zclip_z", "-2.0"),
        ({"method": "zclip", "zclip_alpha": 1.0}, "zclip_alpha", "(0, 1)"),
        ({"method": "zclip", "zclip_alpha": 0.0}, "zclip_alpha", "0.0"),
        ({"method": "norm", "norm_type": 0}, "norm_type", "0"),
        ({"method": "norm", "max_norm": "1"}, "max_norm", "'1'"),
    ],
)
def test_make_clipper_rejects_bad_input(kwargs: dict, name: str, shown: str):
    with pytest.raises(ValueError) as info:
        make_clipper(**kwargs)
    message = str(info.value)
    assert name in message and shown in message


def test_clipper_constructors_reject_bad_input():
    with pytest.raises(ValueError, match="percentile"):
        AutoClip(percentile=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ZClip(warmup_steps=0)
    with pytest.raises(ValueError, match="mode"):
        ZClip(mode="mean")


# --- lesson helpers ----------------------------------------------------------------------------


def tiny_model_with_grads() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[2].bias.requires_grad_(False)  # frozen: grad stays None
    (model(torch.randn(16, 4)) ** 2).sum().mul(50).backward()
    return model


def test_per_layer_grad_norms():
    model = tiny_model_with_grads()
    norms = per_layer_grad_norms(model)
    assert list(norms) == ["0.weight", "0.bias", "2.weight"]
    for name, value in norms.items():
        assert value == pytest.approx(float(model.get_parameter(name).grad.norm()), rel=1e-6)


def test_value_clipping_turns_the_gradient_but_norm_clipping_does_not():
    model = tiny_model_with_grads()
    before = snapshot_grads(model.parameters())
    clip_grad_norm_(model.parameters(), 0.1)
    after = snapshot_grads(model.parameters())
    assert float(torch.cat([g.flatten() for g in after]).norm()) < 0.11  # it did clip
    assert abs(grad_cosine(before, after) - 1.0) < 1e-6

    model = tiny_model_with_grads()
    before = snapshot_grads(model.parameters())
    clip_grad_value_(model.parameters(), 0.01)
    assert grad_cosine(before, snapshot_grads(model.parameters())) < 0.999


def test_snapshot_grads_is_a_copy():
    model = tiny_model_with_grads()
    snap = snapshot_grads(model.parameters())
    assert len(snap) == 3
    model[0].weight.grad.zero_()
    assert snap[0].abs().sum() > 0


# --- the exercise checker ----------------------------------------------------------------------


def per_tensor_clip(grads: list[torch.Tensor], max_norm: float) -> float:
    """Typical mistake: each tensor clipped by its own norm, the largest one returned."""
    norms = [float(g.norm()) for g in grads]
    for g, n in zip(grads, norms, strict=True):
        g.mul_(min(max_norm / n, 1.0))
    return max(norms)


def out_of_place_clip(grads: list[torch.Tensor], max_norm: float) -> float:
    """Typical mistake: the right numbers, written into new tensors."""
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads))
    for i, g in enumerate(grads):
        grads[i] = g * min(max_norm / total, 1.0)
    return total


def always_scale(grads: list[torch.Tensor], max_norm: float) -> float:
    """Typical mistake: no min(., 1), so small gradients are scaled *up*."""
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads))
    for g in grads:
        g.mul_(max_norm / total)
    return total


def test_checker_accepts_the_reference_and_torch_based_solutions():
    assert check_global_norm_clip(reference_global_norm_clip).startswith("Correct!")

    def with_torch(grads: list[torch.Tensor], max_norm: float) -> float:
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # the same tensor objects: torch scales them in place
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    assert check_global_norm_clip(with_torch).startswith("Correct!")


@pytest.mark.parametrize(
    ("solution", "hint"),
    [
        (per_tensor_clip, "did you take the norm of each tensor separately?"),
        (out_of_place_clip, "not modified in place"),
        (always_scale, "you clipped when the norm was below max_norm"),
        (lambda grads, max_norm: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_checker_gives_the_specific_hint(solution, hint: str):
    message = check_global_norm_clip(solution)
    assert not message.startswith("Correct")
    assert hint in message


# --- the benchmark runs (its numbers are reported by the benchmark, not asserted here) --------


def test_bench_clip_smoke(capsys: pytest.CaptureFixture[str]):
    # Loaded by path: `benchmarks` is a folder of scripts, not an installed package.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clip.py"
    spec = importlib.util.spec_from_file_location("bench_clip_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert len(bench.gpt_like_shapes(120, 8)) == 120
    table = bench.bench_clip(n_tensors=100, repeats=2, d_models=(8,), device="cpu")
    assert list(table["n_tensors"]) == [100]
    assert table["labkit_ms"].iloc[0] > 0 and table["torch_ms"].iloc[0] > 0
    ratio = table["labkit_ms"].iloc[0] / table["torch_ms"].iloc[0]
    assert table["ratio"].iloc[0] == pytest.approx(ratio, abs=1e-3)
    assert {"platform", "cpu_count", "torch", "device"} <= set(table.columns)
    assert bench.run(["--n-tensors", "100", "--repeats", "2", "--d-model", "8"]) == 0
    assert "ratio" in capsys.readouterr().out
