"""Global-norm clipping across two real Gloo processes, each holding half of the gradients.

The parent starts a TCPStore on a free port (port 0), spawns two workers that rendezvous
through it, and each worker saves its results to a file. Every wait is bounded and the
workers are killed in a ``finally`` block, so a hang fails the test instead of the CI run.
"""

from __future__ import annotations

import math
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from labkit.clip import AutoClip, ZClip, clip_grad_norm_

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


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: clip its piece with group=WORLD in several settings, save what it saw."""
    out = Path(out_dir)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=timedelta(seconds=30),
        )
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
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the two workers once; return each rank's saved results."""
    out_dir = tmp_path_factory.mktemp("clip_dist")
    # The parent hosts the rendezvous store on port 0: the OS picks a free port.
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
    )
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(rank, store.port, str(out_dir)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        errors = {r: (out_dir / f"rank{r}.err") for r in range(WORLD_SIZE)}
        for rank, p in enumerate(procs):
            if errors[rank].exists():
                pytest.fail(f"rank {rank} failed:\n{errors[rank].read_text()}")
            if p.is_alive():
                pytest.fail(f"rank {rank} did not finish within {TIMEOUT_S} s")
            assert p.exitcode == 0, f"rank {rank} exited with code {p.exitcode}"
        return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


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
