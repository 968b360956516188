"""NaiveDP, BucketedDP and ShardedOptimizer on a plain nn.Module, in a process group we set up.

This is how a learner uses them on their own model: no labkit training loop. Two Gloo workers
(started by ``labkit.launch.spawn``: free port, bounded, reaped) each run every scenario and
return what they saw; the parent recomputes the expected values in a single process.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit.launch import spawn
from labkit.parallel.data_parallel import BucketedDP, NaiveDP
from labkit.parallel.zero import ShardedOptimizer
from labkit.schedules import get_schedule

WORLD_SIZE = 2
TIMEOUT_S = 90.0
VOCAB, WIDTH = 11, 6
# "tiny" buckets hold ~100 bytes: every parameter gets a bucket of its own.
WRAPPERS = {"naive": None, "bucketed": 25.0, "bucketed-tiny": 1e-4}
SHAPES = [(7, 3), (5,), (4, 4), (1,), (9, 2)]  # for the optimizer: uneven sizes to partition
OPT_STEPS = 4


class TiedNet(nn.Module):
    """Embedding -> hidden -> frozen layer -> output tied to the embedding; plus a buffer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.hidden = nn.Linear(WIDTH, WIDTH)
            self.frozen = nn.Linear(WIDTH, WIDTH)
            self.out = nn.Linear(WIDTH, VOCAB, bias=False)
            self.register_buffer("temperature", torch.rand(1) + 0.5)
        self.frozen.requires_grad_(False)
        self.out.weight = self.embed.weight  # tied: one parameter used twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frozen(torch.tanh(self.hidden(self.embed(x))))
        return self.out(h) / self.temperature


def batch(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's micro-batch: different on every rank and micro-batch."""
    gen = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randint(0, VOCAB, (8,), generator=gen), torch.randint(
        0, VOCAB, (8,), generator=gen
    )


def loss_of(model: nn.Module, rank: int, micro: int) -> torch.Tensor:
    x, y = batch(rank, micro)
    return F.cross_entropy(model(x), y, reduction="sum")


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()
    }


def opt_init(seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def opt_grads(step: int) -> list[torch.Tensor]:
    """The same gradients on every rank (ZeRO-1 runs after the gradient all-reduce)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def schedule():
    return get_schedule("cosine", peak_lr=0.1, total_steps=OPT_STEPS + 2, warmup_steps=2)


# --------------------------------------------------------------------------- inside a worker
def _wrapper_scenarios(rank: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, bucket_mb in WRAPPERS.items():
        model = TiedNet(seed=rank)  # different on each rank: the wrapper must broadcast rank 0's
        dp = NaiveDP(model) if bucket_mb is None else BucketedDP(model, bucket_mb=bucket_mb)
        seen: dict = {"init": {k: v.clone() for k, v in model.state_dict().items()}}

        # One backward, then finish_grad_sync.
        loss_of(dp, rank, 0).backward()
        if bucket_mb is not None:
            seen["buckets"] = len(dp.buckets)
            seen["launched_during_backward"] = dp.next_bucket
        dp.finish_grad_sync()
        seen["plain"] = grads_of(model)

        # Accumulation: micro-batch 1 under no_sync, micro-batch 2 synchronised.
        model.zero_grad(set_to_none=True)
        with dp.no_sync():
            loss_of(dp, rank, 1).backward()
            dp.finish_grad_sync()  # inside no_sync: must not communicate
        seen["local"] = grads_of(model)
        loss_of(dp, rank, 2).backward()
        dp.finish_grad_sync()
        seen["accumulated"] = grads_of(model)

        # Again with zero_grad(set_to_none=False): gradients stay (bucket) tensors, zeroed.
        model.zero_grad(set_to_none=False)
        loss_of(dp, rank, 0).backward()
        dp.finish_grad_sync()
        seen["again"] = grads_of(model)
        seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        out[name] = seen
    return out


def _optimizer_scenario(rank: int) -> dict:
    params = [nn.Parameter(t) for t in opt_init()]
    opt = ShardedOptimizer(params, torch.optim.Adam, lr=0.1, betas=(0.9, 0.99))
    scheduler = schedule().as_scheduler(opt)
    seen: dict = {"params": [], "inner_lr": [], "saved": None}
    for step in range(OPT_STEPS):
        for p, g in zip(params, opt_grads(step), strict=True):
            p.grad = g.clone()
        opt.step()
        seen["inner_lr"].append(opt.optim.param_groups[0]["lr"])  # the LR this step used
        scheduler.step()
        seen["params"].append([p.detach().clone() for p in params])
        if step == 1:
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
            seen["saved"] = (buffer.getvalue(), [p.detach().clone() for p in params])
    seen["owned"] = sorted(i for i, r in enumerate(opt.owners) if r == rank)
    seen["state_params"] = len(opt.optim.state)

    # Resume from the state saved after step 1 into a fresh optimizer; continue to the end.
    blob, values = seen["saved"]
    resumed_params = [nn.Parameter(v.clone()) for v in values]
    resumed = ShardedOptimizer(resumed_params, torch.optim.Adam, lr=0.5)  # lr from the state
    resumed_scheduler = schedule().as_scheduler(resumed)
    saved = torch.load(io.BytesIO(blob), weights_only=False)
    resumed.load_state_dict(saved["opt"])
    resumed_scheduler.load_state_dict(saved["sched"])
    for step in range(2, OPT_STEPS):
        for p, g in zip(resumed_params, opt_grads(step), strict=True):
            p.grad = g.clone()
        resumed.step()
        resumed_scheduler.step()
    seen["resumed"] = [p.detach().clone() for p in resumed_params]
    seen["saved"] = None
    return seen


def _worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    return {"wrappers": _wrapper_scenarios(rank), "optimizer": _optimizer_scenario(rank)}


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    """Run the two workers once (labkit.launch.spawn: free port, bounded, reaped)."""
    return spawn(_worker, WORLD_SIZE, timeout_s=TIMEOUT_S, threads=1)


# --------------------------------------------------------------------------- references
def local_grads(micro_batches: list[int], rank: int) -> dict[str, torch.Tensor | None]:
    """Gradients one rank computes alone (rank 0's initial weights), summed over micro-batches."""
    model = TiedNet(seed=0)
    for micro in micro_batches:
        loss_of(model, rank, micro).backward()
    return grads_of(model)


def averaged_grads(micro_batches: list[int]) -> dict[str, torch.Tensor | None]:
    per_rank = [local_grads(micro_batches, r) for r in range(WORLD_SIZE)]
    return {
        n: None if per_rank[0][n] is None else sum(g[n] for g in per_rank) / WORLD_SIZE
        for n in per_rank[0]
    }


def assert_grads_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, f"{name} should have no gradient"
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the tests
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_construction_broadcasts_rank0(rank_results, wrapper):
    expected = TiedNet(seed=0).state_dict()
    for results in rank_results:
        init = results["wrappers"][wrapper]["init"]
        for name, value in expected.items():
            assert torch.equal(init[name], value), f"{name} differs from rank 0's"
    assert not torch.equal(TiedNet(seed=1).hidden.weight, TiedNet(seed=0).hidden.weight)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_finish_grad_sync_averages(rank_results, wrapper):
    expected = averaged_grads([0])
    assert expected["frozen.weight"] is None and expected["embed.weight"] is not None
    for results in rank_results:
        assert_grads_equal(results["wrappers"][wrapper]["plain"], expected)
        assert_grads_equal(results["wrappers"][wrapper]["again"], expected)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_no_sync_accumulates_locally_then_averages_the_sum(rank_results, wrapper):
    for rank, results in enumerate(rank_results):
        seen = results["wrappers"][wrapper]
        assert_grads_equal(seen["local"], local_grads([1], rank))  # nothing was exchanged
        assert_grads_equal(seen["accumulated"], averaged_grads([1, 2]))
    # The ranks really had different local gradients (so the check above means something).
    a, b = (r["wrappers"][wrapper]["local"]["hidden.weight"] for r in rank_results)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_frozen_parameter_and_buffer_untouched(rank_results, wrapper):
    expected = TiedNet(seed=0).state_dict()
    for results in rank_results:
        after = results["wrappers"][wrapper]["after"]
        assert torch.equal(after["frozen.weight"], expected["frozen.weight"])
        assert torch.equal(after["temperature"], expected["temperature"])


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_tied_weight_synchronised_once(rank_results, wrapper):
    # Both uses' gradients are summed into one .grad; it is averaged once, not twice.
    expected = averaged_grads([0])["embed.weight"]
    for results in rank_results:
        grads = results["wrappers"][wrapper]["plain"]
        assert "out.weight" not in grads  # named_parameters lists the tied weight once
        torch.testing.assert_close(grads["embed.weight"], expected, rtol=1e-5, atol=1e-6)


def test_bucketed_launches_all_reduces_during_backward(rank_results):
    n_trainable = sum(p.requires_grad for p in TiedNet(0).parameters())
    for results in rank_results:
        tiny, big = results["wrappers"]["bucketed-tiny"], results["wrappers"]["bucketed"]
        assert tiny["buckets"] == n_trainable  # one parameter per bucket
        assert big["buckets"] == 1
        # Every bucket's all-reduce had started before backward returned (overlap).
        assert tiny["launched_during_backward"] == tiny["buckets"]


def test_sharded_optimizer_equals_plain_adam_with_a_schedule(rank_results):
    params = [nn.Parameter(t) for t in opt_init()]
    plain = torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.99))
    scheduler = schedule().as_scheduler(plain)
    lrs = []
    for step in range(OPT_STEPS):
        for p, g in zip(params, opt_grads(step), strict=True):
            p.grad = g.clone()
        lrs.append(plain.param_groups[0]["lr"])
        plain.step()
        scheduler.step()
        for results in rank_results:
            for ours, theirs in zip(results["optimizer"]["params"][step], params, strict=True):
                torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
    assert len(set(lrs)) > 2  # the warm-up and the decay really changed the LR
    for results in rank_results:
        assert results["optimizer"]["inner_lr"] == pytest.approx(lrs, rel=0, abs=0)


def test_sharded_optimizer_keeps_only_its_shard(rank_results):
    owned = [r["optimizer"]["owned"] for r in rank_results]
    assert sorted(owned[0] + owned[1]) == list(range(len(SHAPES)))  # disjoint, complete
    assert all(owned)  # both ranks own something
    for results in rank_results:
        assert results["optimizer"]["state_params"] == len(results["optimizer"]["owned"])


def test_sharded_optimizer_resumes_from_its_state_dict(rank_results):
    for results in rank_results:
        final = results["optimizer"]["params"][-1]
        for ours, theirs in zip(results["optimizer"]["resumed"], final, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
