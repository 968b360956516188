"""Tests for labkit.schedules: reference numbers, resume, pickling, warm-ups, validation."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

from labkit.exercises.schedules import check_warmup_cosine, reference_warmup_cosine
from labkit.schedules import (
    SCHEDULES,
    WARMUPS,
    Schedule,
    ScheduleLR,
    get_schedule,
    goyal_warmup_steps,
    scale_lr_linear,
    scale_lr_sqrt,
    transformer_lr,
    validate_schedule_args,
)

REL = 1e-12  # "the same number": equal floats, or a few ulps apart


def assert_same_lrs(ours: list[float], reference: list[float]) -> None:
    assert len(ours) == len(reference)
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a == pytest.approx(b, rel=REL, abs=0.0), f"step {step}: {a!r} != {b!r}"


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def drive(make_scheduler, steps: int, lr: float) -> list[float]:
    """The LR each optimizer step uses, read from param_groups as a training loop would."""
    opt = _optimizer(lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


# ------------------------------------------------------------------------------------------
# Hugging Face transformers' formulas, re-implemented here (transformers is not a dependency).
# Each returns the factor that LambdaLR multiplies the optimizer's LR by.
# ------------------------------------------------------------------------------------------


def _hf_warmup(step, w):
    return float(step) / float(max(1, w))


def hf_constant(step, *, w):
    return _hf_warmup(step, w) if step < w else 1.0


def hf_linear(step, *, w, t):
    if step < w:
        return _hf_warmup(step, w)
    return max(0.0, float(t - step) / float(max(1, t - w)))


def hf_cosine(step, *, w, t, num_cycles=0.5):
    if step < w:
        return _hf_warmup(step, w)
    progress = float(step - w) / float(max(1, t - w))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def hf_cosine_min_lr(step, *, w, t, num_cycles=0.5, min_lr_rate=0.0):
    if step < w:
        return _hf_warmup(step, w)
    progress = float(step - w) / float(max(1, t - w))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0, factor * (1 - min_lr_rate) + min_lr_rate)


def hf_restarts(step, *, w, t, num_cycles=1):
    if step < w:
        return _hf_warmup(step, w)
    progress = float(step - w) / float(max(1, t - w))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def hf_polynomial(step, *, w, t, lr_end, power, lr_init):
    if step < w:
        return _hf_warmup(step, w)
    if step > t:
        return lr_end / lr_init
    pct_remaining = 1 - (step - w) / (t - w)
    return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init


def hf_inverse_sqrt(step, *, w, timescale=None):
    timescale = timescale or w or 10_000
    if step < w:
        return _hf_warmup(step, w)
    return 1.0 / math.sqrt((step + timescale - w) / timescale)


def hf_wsd(step, *, w, stable, decay, decay_type="cosine", ratio=0.0, num_cycles=0.5):
    if step < w:
        return max(0.0, _hf_warmup(step, w) * (1.0 - ratio) + ratio)
    if step < w + stable:
        return 1.0
    if step < w + stable + decay:
        p = float(step - w - stable) / float(max(1, decay))
        factor = {
            "linear": lambda: 1.0 - p,
            "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * p)),
            "1-sqrt": lambda: 1.0 - math.sqrt(p),
        }[decay_type]()
        return max(0.0, factor * (1.0 - ratio) + ratio)
    return ratio


# (labkit arguments, reference factor function of step): a couple of settings per HF name.
HF_CASES = [
    (
        dict(name="constant", peak_lr=0.1, total_steps=30, warmup_steps=7),
        lambda s: hf_constant(s, w=7),
    ),
    (dict(name="constant", peak_lr=3e-4, total_steps=12), lambda s: hf_constant(s, w=0)),
    (
        dict(name="linear", peak_lr=1e-3, total_steps=50, warmup_steps=10),
        lambda s: hf_linear(s, w=10, t=50),
    ),
    (
        dict(name="linear", peak_lr=0.3, total_steps=17, warmup_steps=0),
        lambda s: hf_linear(s, w=0, t=17),
    ),
    (
        dict(name="cosine", peak_lr=6e-4, total_steps=60, warmup_steps=6),
        lambda s: hf_cosine(s, w=6, t=60),
    ),
    (
        dict(name="cosine", peak_lr=0.7, total_steps=41, warmup_steps=3, num_cycles=1.5),
        lambda s: hf_cosine(s, w=3, t=41, num_cycles=1.5),
    ),
    (
        dict(name="cosine", peak_lr=1e-3, total_steps=40, warmup_steps=5, min_lr=1e-4),
        lambda s: hf_cosine_min_lr(s, w=5, t=40, min_lr_rate=1e-4 / 1e-3),
    ),
    (
        dict(name="cosine_restarts", peak_lr=0.01, total_steps=45, warmup_steps=5, num_cycles=3),
        lambda s: hf_restarts(s, w=5, t=45, num_cycles=3),
    ),
    (
        dict(name="cosine_restarts", peak_lr=2.0, total_steps=20),
        lambda s: hf_restarts(s, w=0, t=20),
    ),
    (
        dict(name="polynomial", peak_lr=1e-3, total_steps=40, warmup_steps=4, min_lr=1e-7),
        lambda s: hf_polynomial(s, w=4, t=40, lr_end=1e-7, power=1.0, lr_init=1e-3),
    ),
    (
        dict(
            name="polynomial", peak_lr=0.5, total_steps=33, warmup_steps=3, min_lr=0.01, power=2.0
        ),
        lambda s: hf_polynomial(s, w=3, t=33, lr_end=0.01, power=2.0, lr_init=0.5),
    ),
    (
        dict(name="inverse_sqrt", peak_lr=1e-3, total_steps=60, warmup_steps=8),
        lambda s: hf_inverse_sqrt(s, w=8),
    ),
    (dict(name="inverse_sqrt", peak_lr=0.2, total_steps=30), lambda s: hf_inverse_sqrt(s, w=0)),
    (
        dict(name="inverse_sqrt", peak_lr=0.2, total_steps=30, warmup_steps=5, timescale=3),
        lambda s: hf_inverse_sqrt(s, w=5, timescale=3),
    ),
    (
        dict(name="wsd", peak_lr=1e-3, total_steps=50, warmup_steps=5, num_decay_steps=10),
        lambda s: hf_wsd(s, w=5, stable=35, decay=10),
    ),
    (
        dict(
            name="wsd",
            peak_lr=0.4,
            total_steps=40,
            warmup_steps=4,
            min_lr=0.04,
            num_decay_steps=12,
            decay_type="1-sqrt",
        ),
        lambda s: hf_wsd(s, w=4, stable=24, decay=12, decay_type="1-sqrt", ratio=0.04 / 0.4),
    ),
    (
        dict(
            name="wsd",
            peak_lr=0.4,
            total_steps=40,
            warmup_steps=4,
            num_stable_steps=10,
            num_decay_steps=20,
            decay_type="linear",
        ),
        lambda s: hf_wsd(s, w=4, stable=10, decay=20, decay_type="linear"),
    ),
]


@pytest.mark.parametrize("args,factor", HF_CASES)
def test_hf_named_schedules_match_hf_formulas(args, factor):
    args = dict(args)
    schedule = get_schedule(args.pop("name"), **args)
    steps = schedule.total_steps + 5  # the whole run, its end, and a little past it
    reference = drive(
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), steps, args["peak_lr"]
    )
    assert_same_lrs(schedule.curve(steps), reference)


def test_hf_named_schedules_match_transformers_when_installed():
    transformers = pytest.importorskip("transformers")
    T, W, peak = 40, 6, 1e-3
    cases = [
        (dict(name="constant"), lambda o: transformers.get_constant_schedule_with_warmup(o, W)),
        (dict(name="linear"), lambda o: transformers.get_linear_schedule_with_warmup(o, W, T)),
        (dict(name="cosine"), lambda o: transformers.get_cosine_schedule_with_warmup(o, W, T)),
        (
            dict(name="cosine_restarts", num_cycles=2),
            lambda o: transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
                o, W, T, num_cycles=2
            ),
        ),
        (
            dict(name="polynomial", min_lr=1e-7, power=2.0),
            lambda o: transformers.get_polynomial_decay_schedule_with_warmup(
                o, W, T, lr_end=1e-7, power=2.0
            ),
        ),
        (dict(name="inverse_sqrt"), lambda o: transformers.get_inverse_sqrt_schedule(o, W)),
    ]
    for args, make in cases:
        args = dict(args)
        schedule = get_schedule(
            args.pop("name"), peak_lr=peak, total_steps=T, warmup_steps=W, **args
        )
        assert_same_lrs(schedule.curve(T + 1), drive(make, T + 1, peak))


# ------------------------------------------------------------------------------------------
# torch's schedulers, driven step by step. StepLR and ExponentialLR multiply the previous LR
# (recursive), labkit uses the closed form: they agree to a few ulps, hence rel=1e-12.
# ------------------------------------------------------------------------------------------

TORCH_CASES = [
    (
        dict(name="one_cycle", peak_lr=0.1, total_steps=50),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.1, total_steps=50, cycle_momentum=False
        ),
    ),
    (
        dict(
            name="one_cycle",
            peak_lr=2e-3,
            total_steps=37,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
        ),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o,
            max_lr=2e-3,
            total_steps=37,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
            cycle_momentum=False,
        ),
    ),
    (
        dict(name="one_cycle", peak_lr=0.5, total_steps=40, pct_start=0.2, three_phase=True),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.5, total_steps=40, pct_start=0.2, three_phase=True, cycle_momentum=False
        ),
    ),
    (
        dict(name="step", peak_lr=0.1, total_steps=40, step_size=7, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    ),
    (
        dict(name="step", peak_lr=0.3, total_steps=30),  # defaults: step_size=10, gamma=0.1
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.1),
    ),
    (
        dict(name="exponential", peak_lr=0.1, total_steps=60, gamma=0.93),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.93),
    ),
]


@pytest.mark.parametrize("args,make", TORCH_CASES)
def test_torch_named_schedules_match_torch_schedulers(args, make):
    args = dict(args)
    schedule = get_schedule(args.pop("name"), **args)
    reference = drive(make, schedule.total_steps, args["peak_lr"])
    assert_same_lrs(schedule.curve(), reference)


@pytest.mark.parametrize("args,make", TORCH_CASES[2:])
def test_torch_named_schedules_start_after_the_warmup(args, make):
    # With a warm-up of w steps, the torch schedule runs over the remaining steps, from step w.
    args, w = dict(args), 5
    args["total_steps"] += w  # so the torch part keeps its own total_steps
    schedule = get_schedule(args.pop("name"), warmup_steps=w, **args)
    reference = drive(make, schedule.total_steps - w, args["peak_lr"])
    assert_same_lrs(schedule.curve()[w:], reference)
    assert schedule.curve(w) == [args["peak_lr"] * (s / w) for s in range(w)]


def test_transformer_rule_is_inverse_sqrt():
    d_model, warmup = 512, 400
    schedule = transformer_lr(d_model, warmup, total_steps=2000)
    assert schedule.name == "inverse_sqrt"
    assert schedule(0) == 0.0
    for step in range(1, 2000, 3):
        paper = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert schedule(step) == pytest.approx(paper, rel=REL), step


# ------------------------------------------------------------------------------------------
# Resume, pickling, the adapter.
# ------------------------------------------------------------------------------------------

RESUME_SCHEDULES = [
    dict(name="cosine", peak_lr=1e-3, total_steps=30, warmup_steps=5, min_lr=1e-5),
    dict(name="one_cycle", peak_lr=0.1, total_steps=30, three_phase=True, pct_start=0.2),
    dict(name="exponential", peak_lr=0.1, total_steps=30, warmup_steps=3, warmup="exponential"),
    dict(name="wsd", peak_lr=0.1, total_steps=30, warmup="untuned_exponential", beta2=0.9),
]


@pytest.mark.parametrize("args", RESUME_SCHEDULES, ids=lambda a: a["name"])
@pytest.mark.parametrize("k", [1, 4, 17])
def test_resumed_scheduler_continues_exactly(args, k):
    args = dict(args)
    schedule = get_schedule(args.pop("name"), **args)
    total = schedule.total_steps

    def run(opt, sched, steps):
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    opt = _optimizer()
    uninterrupted = run(opt, schedule.as_scheduler(opt), total)

    opt = _optimizer()
    sched = schedule.as_scheduler(opt)
    before = run(opt, sched, k)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    # weights_only=True: the checkpoint must hold plain values, no pickled functions or classes.
    saved = torch.load(buffer, weights_only=True)

    fresh_opt = _optimizer(lr=123.0)  # a different initial LR must not matter
    fresh = get_schedule(**schedule.to_dict()).as_scheduler(fresh_opt)
    fresh_opt.load_state_dict(saved["opt"])
    fresh.load_state_dict(saved["sched"])
    after = run(fresh_opt, fresh, total - k)
    assert before + after == uninterrupted


def test_scheduler_resumes_even_without_the_optimizer_state():
    schedule = get_schedule("linear", peak_lr=0.5, total_steps=20, warmup_steps=4)
    opt = _optimizer()
    sched = schedule.as_scheduler(opt)
    for _ in range(9):
        opt.step()
        sched.step()
    fresh_opt = _optimizer(lr=7.0)
    fresh = schedule.as_scheduler(fresh_opt)
    fresh.load_state_dict(sched.state_dict())
    assert fresh_opt.param_groups[0]["lr"] == schedule(9)
    assert fresh.get_last_lr() == [schedule(9)]


def test_scheduler_sets_absolute_lr_on_every_group():
    schedule = get_schedule("cosine", peak_lr=0.2, total_steps=10, warmup_steps=2)
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 5.0}, {"params": [p2], "lr": 0.01}])
    sched = schedule.as_scheduler(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert isinstance(sched, ScheduleLR)
    for step in range(10):
        assert [g["lr"] for g in opt.param_groups] == [schedule(step)] * 2
        opt.step()
        sched.step()


def test_loading_a_different_schedule_warns():
    opt = _optimizer()
    saved = get_schedule("cosine", peak_lr=0.1, total_steps=20).as_scheduler(opt).state_dict()
    other = get_schedule("linear", peak_lr=0.1, total_steps=20).as_scheduler(_optimizer())
    with pytest.warns(UserWarning, match="different schedule|checkpoint was saved with"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_survives_pickle_and_repr(name):
    schedule = get_schedule(name, peak_lr=0.3, total_steps=40, warmup_steps=4)
    clone = pickle.loads(pickle.dumps(schedule))
    assert clone == schedule
    assert clone.curve(50) == schedule.curve(50)
    text = repr(schedule)
    assert text.startswith(f"Schedule({name!r}, peak_lr=0.3, total_steps=40, warmup_steps=4")
    assert eval(text, {"Schedule": Schedule}) == schedule
    assert schedule != get_schedule(name, peak_lr=0.3, total_steps=40, warmup_steps=5)


def test_curve_defaults_to_the_run():
    schedule = get_schedule("linear", peak_lr=1.0, total_steps=8, warmup_steps=2)
    assert schedule.curve() == [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert len(schedule.curve(3)) == 3


# ------------------------------------------------------------------------------------------
# Warm-ups.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "one_cycle"])
def test_linear_warmup_reaches_the_peak_at_warmup_steps(name):
    w, peak = 6, 0.25
    schedule = get_schedule(name, peak_lr=peak, total_steps=30, warmup_steps=w)
    assert schedule(0) == 0.0
    assert schedule(w) == peak
    assert schedule(w - 1) < peak
    lrs = schedule.curve(w + 1)
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))


def test_exponential_warmup_is_a_geometric_ramp():
    w, peak = 10, 1e-3
    schedule = get_schedule(
        "constant", peak_lr=peak, total_steps=20, warmup_steps=w, warmup="exponential"
    )
    lrs = schedule.curve(w + 1)
    assert lrs[0] == pytest.approx(0.01 * peak)
    assert lrs[w] == peak
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(r == pytest.approx(100 ** (1 / w)) for r in ratios)  # constant growth factor
    custom = get_schedule(
        "cosine",
        peak_lr=peak,
        total_steps=20,
        warmup_steps=w,
        warmup="exponential",
        warmup_start_factor=0.5,
    )
    assert custom(0) == pytest.approx(0.5 * peak)
    assert (
        custom.curve()[w:]
        == get_schedule("cosine", peak_lr=peak, total_steps=20, warmup_steps=w).curve()[w:]
    )


@pytest.mark.parametrize("beta2,length", [(0.99, 200), (0.95, 40), (0.9, 20), (0.999, 2000)])
def test_untuned_linear_lasts_two_over_one_minus_beta2(beta2, length):
    peak = 0.01
    schedule = get_schedule(
        "constant", peak_lr=peak, total_steps=2 * length, warmup="untuned_linear", beta2=beta2
    )
    assert schedule.warmup_length == length
    lrs = schedule.curve(length + 2)
    assert lrs[0] == 0.0
    assert all(a < b for a, b in zip(lrs[: length + 1], lrs[1 : length + 1], strict=False))
    assert lrs[length - 1] < peak
    assert lrs[length] == lrs[length + 1] == peak
    assert lrs[length // 2] == pytest.approx(peak / 2)


def test_untuned_exponential_ramps_as_one_minus_exp():
    beta2, peak = 0.98, 1.0
    schedule = get_schedule(
        "constant", peak_lr=peak, total_steps=300, warmup="untuned_exponential", beta2=beta2
    )
    lrs = schedule.curve()
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[50] == pytest.approx(peak * (1 - math.exp(-1.0)))  # one time constant, 1/(1-beta2)
    assert lrs[-1] < peak


@pytest.mark.parametrize("warmup", ["untuned_linear", "untuned_exponential"])
def test_untuned_warmups_multiply_the_whole_schedule(warmup):
    beta2 = 0.9
    schedule = get_schedule("cosine", peak_lr=0.1, total_steps=60, warmup=warmup, beta2=beta2)
    base = get_schedule("cosine", peak_lr=0.1, total_steps=60)
    for step in range(60):
        if warmup == "untuned_linear":
            omega = min(1.0, step / 20)
        else:
            omega = 1 - math.exp(-(1 - beta2) * step)
        assert schedule(step) == pytest.approx(omega * base(step), rel=REL, abs=1e-18)


def test_beta2_is_ignored_by_tuned_warmups():
    # The training loop passes the optimizer's beta2 whatever the warm-up.
    a = get_schedule("cosine", peak_lr=0.1, total_steps=20, warmup_steps=3, beta2=0.95)
    b = get_schedule("cosine", peak_lr=0.1, total_steps=20, warmup_steps=3)
    assert a == b


def test_min_lr_is_the_end_of_a_decay_or_its_floor():
    peak, floor = 1.0, 0.1
    for name in ("linear", "cosine", "cosine_restarts", "polynomial", "wsd"):
        schedule = get_schedule(name, peak_lr=peak, total_steps=40, warmup_steps=4, min_lr=floor)
        assert schedule(40) == pytest.approx(floor, rel=1e-12), name
        assert min(schedule.curve()[4:]) >= floor * (1 - 1e-12), name
    for name, knob in (
        ("inverse_sqrt", "timescale"),
        ("step", "step_size"),
        ("exponential", "gamma"),
    ):
        value = 0.5 if knob == "gamma" else 4
        schedule = get_schedule(name, peak_lr=peak, total_steps=400, min_lr=floor, **{knob: value})
        lrs = schedule.curve()
        assert lrs[0] == peak and lrs[-1] == floor and min(lrs) == floor, name


# ------------------------------------------------------------------------------------------
# Validation: every bad input raises ValueError naming the field.
# ------------------------------------------------------------------------------------------

GOOD = dict(name="cosine", peak_lr=1e-3, total_steps=100, warmup_steps=10)

BAD = [
    (dict(name="cosin"), "name"),
    (dict(name=None), "name"),
    (dict(warmup="quadratic"), "warmup"),
    (dict(warmup_steps=101), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(peak_lr=-1e-3), "peak_lr"),
    (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(peak_lr="1e-3"), "peak_lr"),
    (dict(min_lr=-1e-5), "min_lr"),
    (dict(min_lr=2e-3), "min_lr"),
    (dict(total_steps=100.0), "total_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(warmup="untuned_linear", warmup_steps=0), "beta2"),
    (dict(warmup="untuned_exponential", warmup_steps=0, beta2=1.0), "beta2"),
    (dict(warmup="untuned_linear", warmup_steps=0, beta2=0.0), "beta2"),
    (dict(warmup="untuned_linear", warmup_steps=0, beta2=0.999), "beta2"),  # 2000 > 100 steps
    (dict(warmup="untuned_linear", beta2=0.9), "warmup_steps"),
    (dict(foo=1), "foo"),
    (dict(lr_end=1e-6), "min_lr"),  # HF's name gets pointed to ours
    (dict(num_cycles=0), "num_cycles"),
    (dict(name="constant", min_lr=1e-4), "min_lr"),
    (dict(name="one_cycle", min_lr=1e-4), "min_lr"),
    (dict(name="one_cycle", pct_start=1.5), "pct_start"),
    (dict(name="one_cycle", pct_start=0.001), "pct_start"),
    (dict(name="one_cycle", anneal_strategy="cosine"), "anneal_strategy"),
    (dict(name="one_cycle", three_phase="yes"), "three_phase"),
    (dict(name="one_cycle", div_factor=0), "div_factor"),
    (dict(name="step", step_size=0), "step_size"),
    (dict(name="step", gamma=-0.5), "gamma"),
    (dict(name="polynomial", power=0), "power"),
    (dict(name="inverse_sqrt", timescale=0), "timescale"),
    (dict(name="wsd", decay_type="exp"), "decay_type"),
    (dict(name="wsd", num_decay_steps=91), "num_decay_steps"),
    (dict(name="wsd", num_stable_steps=-1), "num_stable_steps"),
    (dict(warmup="exponential", warmup_start_factor=0.0), "warmup_start_factor"),
    (dict(warmup_start_factor=0.1), "warmup_start_factor"),  # only for the exponential warm-up
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_raises_value_error_naming_the_field(change, field):
    args = {**GOOD, **change}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        get_schedule(**args)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        validate_schedule_args(**args)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        get_schedule("cosin", peak_lr=1.0, total_steps=10)
    message = str(err.value)
    assert "'cosin'" in message and "did you mean 'cosine'" in message
    assert all(name in message for name in SCHEDULES)
    with pytest.raises(ValueError) as err:
        get_schedule("cosine", peak_lr=1.0, total_steps=10, warmup="cosine")
    assert all(name in str(err.value) for name in WARMUPS)


def test_validate_accepts_what_get_schedule_accepts():
    validate_schedule_args(**GOOD)
    validate_schedule_args(
        "wsd",
        peak_lr=0.1,
        total_steps=100,
        warmup_steps=0,
        warmup="untuned_linear",
        min_lr=0.0,
        beta2=0.95,
        num_decay_steps=20,
    )


@pytest.mark.parametrize("step", [-1, True, 1.5, "3"])
def test_bad_step_raises(step):
    schedule = get_schedule(**GOOD)
    with pytest.raises(ValueError, match=r"\bstep\b"):
        schedule(step)


# ------------------------------------------------------------------------------------------
# Batch-size scaling helpers.
# ------------------------------------------------------------------------------------------


def test_batch_size_scaling_rules():
    assert scale_lr_linear(0.1, 256, 1024) == pytest.approx(0.4)
    assert scale_lr_sqrt(1e-3, 64, 256) == pytest.approx(2e-3)
    assert scale_lr_linear(0.1, 256, 64) == pytest.approx(0.025)
    # ImageNet, batch 8192, 5 epochs (Goyal et al. 2017): ceil(5 * 1281167 / 8192)
    assert goyal_warmup_steps(1_281_167, 8192) == 782
    with pytest.raises(ValueError, match="base_batch"):
        scale_lr_linear(0.1, 0, 64)
    with pytest.raises(ValueError, match="base_lr"):
        scale_lr_sqrt(-0.1, 32, 64)
    with pytest.raises(ValueError, match="batch_size"):
        goyal_warmup_steps(1000, -8)


# ------------------------------------------------------------------------------------------
# The exercise checker.
# ------------------------------------------------------------------------------------------


def test_checker_accepts_the_reference():
    assert check_warmup_cosine(reference_warmup_cosine).startswith("Correct!")


def _warmup_then(decay):
    def fn(step, *, peak_lr, warmup_steps, total_steps):
        if step < warmup_steps:
            return peak_lr * step / warmup_steps
        return peak_lr * decay((step - warmup_steps) / max(1, total_steps - warmup_steps))

    return fn


def test_checker_spots_off_by_one_warmup():
    def fn(step, *, peak_lr, warmup_steps, total_steps):
        if step < warmup_steps:
            return peak_lr * (step + 1) / warmup_steps
        return reference_warmup_cosine(
            step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps
        )

    message = check_warmup_cosine(fn)
    assert message.startswith("Off by one") and "(step + 1)" in message


def test_checker_spots_wrong_cosine_phase_and_degrees():
    full_wave = _warmup_then(lambda p: 0.5 * (1 + math.cos(2 * math.pi * p)))
    assert "Wrong phase" in check_warmup_cosine(full_wave)
    degrees = _warmup_then(lambda p: 0.5 * (1 + math.cos(180 * p)))
    assert "degrees" in check_warmup_cosine(degrees)


def test_checker_spots_decay_not_reaching_zero_and_peak_never_reached():
    short = _warmup_then(lambda p: 0.5 * (1 + math.cos(0.9 * math.pi * p)))
    assert "does not reach 0" in check_warmup_cosine(short)

    def unshifted(step, *, peak_lr, warmup_steps, total_steps):
        if step < warmup_steps:
            return peak_lr * step / warmup_steps
        return peak_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    assert "peak is never reached" in check_warmup_cosine(unshifted)


def test_checker_returns_a_message_when_the_function_breaks():
    def no_guard(step, *, peak_lr, warmup_steps, total_steps):
        return reference_warmup_cosine(
            step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps
        ) + 0 * (step / warmup_steps)

    assert "warmup_steps=0" in check_warmup_cosine(no_guard)
    assert "TypeError" in check_warmup_cosine(lambda step: 0.0)
