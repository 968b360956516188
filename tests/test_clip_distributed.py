"""Global-norm clipping across two real Gloo processes, each holding half of the gradients.

``labkit.launch.spawn`` starts the workers: rendezvous on a free port, every wait bounded, every
process reaped, so a hang fails the test instead of the CI run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from labkit.clip import AutoClip, ZClip, clip_grad_norm_
from labkit.launch import spawn

WORLD_SIZE = 2
MAX_NORM = 1.0
SHAPES = [(8, 4), (8,), (4, 8), (4,), (3, 3, 2), (5,), (6, 2), (1,)]
ADAPTIVE_NORMS = [2.0, 1.9, 9.0, 1.8]  # global norms per step; 9.0 is a spike
SPIKE = 2
TIMEOUT_S = 60.0


def model_params(seed: int = 0, scale: float = 1.0) -> list[nn.Parameter]:
    """The whole model's parameters with deterministic gradients (grad norm well above 1)."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 2.0 * scale
    return params


def shard(params: list[nn.Parameter], rank: int, layout: str) -> list[nn.Parameter]:
    """The disjoint piece a rank holds: first/second half, or everything on rank 0."""
    if layout == "halves":
        half = len(params) // 2
        return params[:half] if rank == 0 else params[half:]
    return params if rank == 0 else []  # "empty": rank 1 has nothing but must still take part


def set_global_norm(params: list[nn.Parameter], target: float) -> None:
    """Rescale the whole model's gradients (same on every rank) to a given global 2-norm."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    for p in params:
        p.grad.mul_(target / norm)


def adaptive_clipper(method: str) -> AutoClip | ZClip:
    """AutoClip, or ZClip with a warm-up short enough for the spike to come after it."""
    return AutoClip(percentile=10.0) if method == "autoclip" else ZClip(warmup_steps=2)


def _worker(rank: int, world_size: int) -> dict[str, object]:
    """One rank: clip its piece with group=WORLD in several settings, return what it saw."""
    results: dict[str, object] = {}
    for layout in ("halves", "empty"):
        for norm_type in (2.0, math.inf):
            for group in ("world", "list"):
                mine = shard(model_params(), rank, layout)
                g = dist.group.WORLD if group == "world" else [dist.group.WORLD]
                norm = clip_grad_norm_(mine, MAX_NORM, norm_type, group=g)
                results[f"{layout}-{norm_type}-{group}"] = (norm, [p.grad for p in mine])
    for method in ("autoclip", "zclip"):
        clipper = adaptive_clipper(method)
        steps = []
        for target in ADAPTIVE_NORMS:
            params = model_params()
            set_global_norm(params, target)
            mine = shard(params, rank, "halves")
            norm = clipper(mine, group=dist.group.WORLD)
            steps.append((norm, [p.grad for p in mine]))
        results[method] = steps
    return results


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    """Run the two workers once (labkit.launch.spawn: free port, bounded, reaped)."""
    return spawn(_worker, WORLD_SIZE, timeout_s=TIMEOUT_S, threads=1)


def single_process(norm_type: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch's clip_grad_norm_ on the whole model in one process: the reference."""
    params = model_params()
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, norm_type)
    return norm, [p.grad for p in params]


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["halves", "empty"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("group", ["world", "list"])
def test_sharded_clip_equals_single_process(
    rank_results: list[dict], layout: str, norm_type: float, group: str
):
    expected_norm, expected_grads = single_process(norm_type)
    assert float(expected_norm) > 2 * MAX_NORM  # the case really clips
    (norm0, grads0), (norm1, grads1) = (r[f"{layout}-{norm_type}-{group}"] for r in rank_results)

    # Both ranks agree exactly and equal the norm of the whole model.
    assert torch.equal(norm0, norm1)
    torch.testing.assert_close(norm0, expected_norm, rtol=1e-6, atol=0)
    # The clipped pieces, put back together, are the single-process clipped gradients.
    assert len(grads0) + len(grads1) == len(expected_grads)
    for ours, theirs in zip(grads0 + grads1, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["autoclip", "zclip"])
def test_adaptive_clippers_use_the_global_norm(rank_results: list[dict], method: str):
    # The same clipper in one process, fed the whole model, is the reference.
    clipper = adaptive_clipper(method)
    for step, target in enumerate(ADAPTIVE_NORMS):
        params = model_params()
        set_global_norm(params, target)
        norm = clipper(params)
        (norm0, grads0), (norm1, grads1) = (r[method][step] for r in rank_results)
        assert torch.equal(norm0, norm1)
        torch.testing.assert_close(norm0, norm, rtol=1e-6, atol=0)
        for ours, theirs in zip(grads0 + grads1, [p.grad for p in params], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    # The spike was clipped (to about the ordinary norms): otherwise this proves little.
    _, spike0 = rank_results[0][method][SPIKE]
    _, spike1 = rank_results[1][method][SPIKE]
    clipped = math.sqrt(sum(float(g.norm()) ** 2 for g in spike0 + spike1))
    assert clipped < 2.5 < ADAPTIVE_NORMS[SPIKE]
