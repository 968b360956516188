"""The distributed exercises: each checker passes the facilitator's solution (docs/solutions/),
run on real Gloo processes, and names the mistake of deliberately wrong versions.

The wrong versions below are module-level functions, so they reach the workers by name; the
solutions are loaded from their file path, so they travel as source (the notebook path), and
one test ships a function defined inside the test and one a string of source. One warm pool of
2 workers serves the whole module (``keep_workers``), as in a notebook: a check that passes or
fails without an exception takes well under a second after the first.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

from labkit.exercises.ddp_hook import check_bucket_hook
from labkit.exercises.megatron_fg import check_f_g
from labkit.exercises.pipeline import check_one_f_one_b_any, my_one_f_one_b
from labkit.exercises.ring import check_ring_all_reduce, exchange, my_ring_all_reduce
from labkit.exercises.zero1 import check_zero1_step
from labkit.parallel.pp_orders import gpipe_order
from labkit.supervisor import keep_workers

SOLUTIONS = Path(__file__).resolve().parents[1] / "docs" / "solutions"


def solution(name: str) -> ModuleType:
    """A file of docs/solutions as a module (it is no package: the learner's path stays clean)."""
    spec = importlib.util.spec_from_file_location(f"solution_{name}", SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def warm_workers():
    keep_workers(True)
    yield
    keep_workers(False)  # closes the pool
    keep_workers(None)


# ------------------------------------------------------------------------- ring all-reduce
def _ring(tensor, group=None, rs_steps=None, gather_adds=False):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    right, left = (rank + 1) % n, (rank - 1) % n
    chunks = list(torch.tensor_split(tensor.view(-1), n))
    incoming = torch.empty_like(chunks[0])
    for s in range(n - 1 if rs_steps is None else rs_steps):
        target = chunks[(rank - s - 1) % n]
        exchange(chunks[(rank - s) % n], incoming[: target.numel()], right, left, group)
        target.add_(incoming[: target.numel()])
    for s in range(n - 1):
        target = chunks[(rank - s) % n]
        if gather_adds:
            exchange(chunks[(rank + 1 - s) % n], incoming[: target.numel()], right, left, group)
            target.add_(incoming[: target.numel()])
        else:
            exchange(chunks[(rank + 1 - s) % n], target, right, left, group)
    return tensor


def ring_contiguous_only(tensor, group=None):
    return _ring(tensor, group) if tensor.is_contiguous() else tensor


def ring_stops_early(tensor, group=None):
    n = dist.get_world_size(group)
    return _ring(tensor, group, rs_steps=n - 2) if tensor.is_contiguous() else tensor


def ring_gather_adds(tensor, group=None):
    return _ring(tensor, group, gather_adds=True) if tensor.is_contiguous() else tensor


def ring_no_gather(tensor, group=None):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = list(torch.tensor_split(tensor.view(-1) if tensor.is_contiguous() else tensor, n))
    incoming = torch.empty_like(chunks[0])
    for s in range(n - 1):
        target = chunks[(rank - s - 1) % n]
        exchange(
            chunks[(rank - s) % n],
            incoming[: target.numel()],
            (rank + 1) % n,
            (rank - 1) % n,
            group,
        )
        target.add_(incoming[: target.numel()])
    return tensor


def ring_on_a_copy(tensor, group=None):
    return solution("ring").ring_all_reduce(tensor.clone(), group)


def ring_library(tensor, group=None):
    dist.all_reduce(tensor, group=group)
    return tensor


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (ring_no_gather, "the all-gather loop is missing or stops early"),
        (
            ring_stops_early,
            "is the sum of only 1 of 2 ranks ([1]): the reduce-scatter loop stops early",
        ),
        (ring_gather_adds, "counts rank 0's data 2 times"),
        (ring_on_a_copy, "is not changed: the all-reduce works in place"),
        (ring_library, "calls dist.all_reduce"),
        (ring_contiguous_only, "(non-contiguous)"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[:20],
)
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ring_checker_names_the_mistake(fn, expected):
    message = check_ring_all_reduce(fn)
    assert message.startswith("Not yet") and expected in message, message


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ring_checker_passes_the_solution():
    assert check_ring_all_reduce(solution("ring").ring_all_reduce).startswith("Correct")


# ------------------------------------------------------------------------- DDP bucket hook
def hook_fires_early(bucket, view, group=None):
    def hook(param):
        view.copy_(param.grad)
        param.grad = view
        if bucket.pending == len(bucket.params):  # fires on the first gradient
            bucket.work = dist.all_reduce(bucket.buffer, group=group, async_op=True)
        bucket.pending -= 1

    return hook


def hook_blocks(bucket, view, group=None):
    def hook(param):
        view.copy_(param.grad)
        param.grad = view
        bucket.pending -= 1
        if bucket.pending == 0:
            dist.all_reduce(bucket.buffer, group=group)

    return hook


def hook_only_counts(bucket, view, group=None):
    def hook(param):
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.work = dist.all_reduce(bucket.buffer, group=group, async_op=True)

    return hook


def finish_without_reset(buckets, world_size):
    for bucket in buckets:
        bucket.work.wait()
        bucket.buffer /= world_size


def finish_without_mean(buckets, world_size):
    for bucket in buckets:
        bucket.work.wait()
        bucket.pending = len(bucket.params)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_bucket_hook_checker():
    good = solution("ddp_hook")
    assert check_bucket_hook(good.make_hook, good.finish_grad_sync).startswith("Correct")
    cases = [
        (
            hook_fires_early,
            good.finish_grad_sync,
            "bucket 0 fired before all its gradients were ready (1 of 2",
        ),
        (hook_blocks, good.finish_grad_sync, "blocks backward"),
        (hook_only_counts, good.finish_grad_sync, "is not its view of the bucket"),
        (good.make_hook, finish_without_reset, "in step 2 bucket 0 fired 0 times"),
        (good.make_hook, finish_without_mean, "the sum over ranks; divide by world_size"),
    ]
    for make_hook, finish, expected in cases:
        message = check_bucket_hook(make_hook, finish)
        assert message.startswith("Not yet") and expected in message, message


# ------------------------------------------------------------------------- Megatron f and g
def identity(t, group):
    return t


def summed(t, group):
    dist.all_reduce(t, group=group)
    return t


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_f_g_checker():
    good = solution("megatron_fg")
    halves = (good.f_forward, good.f_backward, good.g_forward, good.g_backward)
    assert check_f_g(*halves).startswith("Correct")
    cases = [
        ((identity, identity, summed, identity), "the backward of f must all-reduce"),
        ((identity, summed, summed, summed), "2 times too large"),
        ((identity, summed, identity, identity), "the forward of g must all-reduce"),
        ((summed, identity, identity, summed), "f and g are swapped"),
        ((summed, summed, summed, identity), "f's forward sums x over the ranks"),
    ]
    for fns, expected in cases:
        message = check_f_g(*fns)
        assert message.startswith("Not yet") and expected.lower() in message.lower(), message
    assert "differs from the single-process gradient by" in check_f_g(
        identity, identity, summed, identity
    )


# ------------------------------------------------------------------------- ZeRO-1
def zero1_full_state(params, grad, state, lr, momentum, group=None):
    buf = state.setdefault("momentum", torch.zeros_like(params))
    buf.mul_(momentum).add_(grad)
    params.sub_(lr * buf)


def zero1_no_exchange(params, grad, state, lr, momentum, group=None):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor_split(params, n)[rank]
    buf = state.setdefault("momentum", torch.zeros_like(mine))
    buf.mul_(momentum).add_(torch.tensor_split(grad, n)[rank])
    mine.sub_(lr * buf)


def zero1_forgets(params, grad, state, lr, momentum, group=None):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    slices = torch.tensor_split(params, n)
    state["momentum"] = torch.tensor_split(grad, n)[rank].clone()  # a fresh buffer every step
    slices[rank].sub_(lr * state["momentum"])
    for owner, piece in enumerate(slices):
        dist.broadcast(piece, group_src=owner)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_zero1_checker():
    assert check_zero1_step(solution("zero1").zero1_step).startswith("Correct")
    cases = [
        (zero1_full_state, "keeps 11 numbers of optimizer state for 11 parameters"),
        (zero1_no_exchange, "parameters 6:11 were not updated while 0:6 were"),
        (
            zero1_forgets,
            "after step 2, rank 0's parameters move as if the momentum started from zero",
        ),
    ]
    for fn, expected in cases:
        message = check_zero1_step(fn)
        assert message.startswith("Not yet") and expected in message, message


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_zero1_checker_takes_a_notebook_style_function_and_source():
    """Not importable by name: a function defined here and a string travel as source."""

    def rebinds(params, grad, state, lr, momentum, group=None):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = torch.tensor_split(params, n)[rank]
        buf = state.setdefault("m", torch.zeros_like(mine))
        buf.mul_(momentum).add_(torch.tensor_split(grad, n)[rank])
        mine = mine - lr * buf  # a new tensor: params is unchanged

    assert "did not change: update the slice in place" in check_zero1_step(rebinds)
    source = (SOLUTIONS / "zero1.py").read_text()
    assert check_zero1_step(source).startswith("Correct")


# ------------------------------------------------------------------------- 1F1B, in process
def one_f_one_b_uncapped(m, stage, p):
    warmup = p - stage - 1  # not capped at m
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(max(m - warmup, 0), m)]


def one_f_one_b_warmup_by_stage(m, stage, p):
    warmup = min(stage, m)  # the last stage warms up longest: the pipeline deadlocks
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


def test_one_f_one_b_sweep_checker():
    assert check_one_f_one_b_any(solution("one_f_one_b").one_f_one_b).startswith("Correct")
    assert "That is GPipe" in check_one_f_one_b_any(gpipe_order)
    assert "do not exist: the warm-up is capped at m" in check_one_f_one_b_any(one_f_one_b_uncapped)
    assert "wait for each other forever" in check_one_f_one_b_any(one_f_one_b_warmup_by_stage)
    b_first = check_one_f_one_b_any(
        lambda m, s, p: [x for i in range(m) for x in (("B", i), ("F", i))]
    )
    assert "has a backward before its forward on stage 0" in b_first
    assert "raised NotImplementedError" in check_one_f_one_b_any(my_one_f_one_b)
    no_warmup = check_one_f_one_b_any(
        lambda m, s, p: [x for i in range(m) for x in (("F", i), ("B", i))]
    )
    assert "the first backward should come after 4 forward(s)" in no_warmup


# ------------------------------------------------------------------------- last: pools change
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ring_placeholder_and_a_longer_ring():
    """The placeholder's hint reaches the learner (the failing rank ends the pool), then 3 ranks."""
    message = check_ring_all_reduce(my_ring_all_reduce)
    assert "raised: NotImplementedError: write the reduce-scatter loop" in message
    assert check_ring_all_reduce(solution("ring").ring_all_reduce, world_size=3).startswith(
        "Correct"
    )
    message = check_ring_all_reduce(ring_stops_early, world_size=3)
    assert "of 3 ranks" in message and "reduce-scatter loop stops early" in message, message
