"""Tensor parallelism: the parallel layers equal the dense ones, and "tp" equals "single".

The layer tests run two real Gloo processes through ``labkit.launch.spawn`` (free port, every wait
bounded, processes reaped). Each worker returns what it computed; the parent compares it with the
dense layers computed here, in one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import labkit
from labkit import checkpoint as ckpt
from labkit.launch import spawn
from labkit.model import Attention
from labkit.parallel.tensor_parallel import (
    ColumnParallelLinear,
    ParallelAttention,
    RowParallelLinear,
    copy_to_parallel,
    reduce_from_parallel,
)

WORLD_SIZE = 2
TIMEOUT_S = 60.0
D_IN, D_HIDDEN, D_OUT, N_HEAD = 8, 12, 6, 4


def dense_layers(seed: int = 0) -> tuple[nn.Linear, nn.Linear, Attention]:
    """The dense reference layers (identical in every process: built from a seed)."""
    torch.manual_seed(seed)
    fc, proj = nn.Linear(D_IN, D_HIDDEN), nn.Linear(D_HIDDEN, D_OUT)
    attn = Attention(D_IN, N_HEAD)
    for p in attn.parameters():  # non-zero biases, so that bias handling is tested too
        nn.init.normal_(p, std=0.3)
    return fc, proj, attn


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An input batch [B, T, D_IN] and the upstream gradients of the two outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, D_IN, generator=g)
    return x, torch.randn(3, 5, D_OUT, generator=g), torch.randn(3, 5, D_IN, generator=g)


def _worker(rank: int, world_size: int) -> dict[str, object]:
    """One rank: run the parallel layers on the same input, return outputs and gradients."""
    fc, proj, attn = dense_layers()
    x, grad_y, grad_a = inputs()
    results: dict[str, object] = {}

    # f and g on their own: f is the identity forward and sums gradients backward;
    # g sums forward and passes gradients through.
    t = torch.full((2,), float(rank + 1), requires_grad=True)
    f_out = copy_to_parallel(t)
    f_out.backward(torch.full((2,), 10.0 * (rank + 1)))
    s = torch.full((2,), float(rank + 1), requires_grad=True)
    g_out = reduce_from_parallel(s * 1.0)
    g_out.backward(torch.full((2,), 3.0))
    results["f"] = (f_out.detach(), t.grad)
    results["g"] = (g_out.detach(), s.grad)

    # Column-parallel fc, GELU, row-parallel proj: the Megatron MLP pattern.
    col, row = ColumnParallelLinear(fc), RowParallelLinear(proj)
    xi = x.clone().requires_grad_()
    y = row(F.gelu(col(xi)))
    y.backward(grad_y)
    results["mlp"] = {
        "y": y.detach(),
        "x.grad": xi.grad,
        "col.weight": col.weight.detach(),
        "col.weight.grad": col.weight.grad,
        "col.bias.grad": col.bias.grad,
        "row.weight": row.weight.detach(),
        "row.weight.grad": row.weight.grad,
        "row.bias.grad": row.bias.grad,
    }

    # Attention with the heads split across the two ranks.
    pattn = ParallelAttention(attn)
    xa = x.clone().requires_grad_()
    a = pattn(xa)
    a.backward(grad_a)
    results["attn"] = {
        "out": a.detach(),
        "x.grad": xa.grad,
        "n_head": pattn.n_head,
        **{f"{n}.grad": p.grad for n, p in pattn.named_parameters()},
    }
    return results


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    """Run the two workers once (labkit.launch.spawn: free port, bounded, reaped)."""
    return spawn(_worker, WORLD_SIZE, timeout_s=TIMEOUT_S, threads=1)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_f_and_g_are_conjugate(rank_results):
    for rank, r in enumerate(rank_results):
        f_out, f_grad = r["f"]
        assert torch.equal(f_out, torch.full((2,), float(rank + 1)))  # identity forward
        assert torch.equal(f_grad, torch.full((2,), 30.0))  # 10 + 20: summed backward
        g_out, g_grad = r["g"]
        assert torch.equal(g_out, torch.full((2,), 3.0))  # 1 + 2: summed forward
        assert torch.equal(g_grad, torch.full((2,), 3.0))  # identity backward


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_column_then_row_parallel_equals_dense(rank_results):
    fc, proj, _ = dense_layers()
    x, grad_y, _ = inputs()
    x.requires_grad_()
    y = proj(F.gelu(fc(x)))
    y.backward(grad_y)
    h = D_HIDDEN // WORLD_SIZE
    close = dict(rtol=1e-5, atol=1e-6)
    for rank, r in enumerate(rank_results):
        mine = r["mlp"]
        rows = slice(rank * h, (rank + 1) * h)
        torch.testing.assert_close(mine["y"], y.detach(), **close)
        torch.testing.assert_close(mine["x.grad"], x.grad, **close)
        # The shards are the dense parameters, and their gradients the dense gradients' slices.
        assert torch.equal(mine["col.weight"], fc.weight.detach()[rows])
        assert torch.equal(mine["row.weight"], proj.weight.detach()[:, rows])
        torch.testing.assert_close(mine["col.weight.grad"], fc.weight.grad[rows], **close)
        torch.testing.assert_close(mine["col.bias.grad"], fc.bias.grad[rows], **close)
        torch.testing.assert_close(mine["row.weight.grad"], proj.weight.grad[:, rows], **close)
        torch.testing.assert_close(mine["row.bias.grad"], proj.bias.grad, **close)
    # The replicated bias's gradient is bitwise the same on both ranks.
    assert torch.equal(
        rank_results[0]["mlp"]["row.bias.grad"], rank_results[1]["mlp"]["row.bias.grad"]
    )


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_parallel_attention_splits_heads_and_equals_dense(rank_results):
    _, _, attn = dense_layers()
    x, _, grad_a = inputs()
    x.requires_grad_()
    out = attn(x)
    out.backward(grad_a)
    width = D_IN // WORLD_SIZE
    close = dict(rtol=1e-5, atol=1e-6)
    for rank, r in enumerate(rank_results):
        mine = r["attn"]
        assert mine["n_head"] == N_HEAD // WORLD_SIZE
        torch.testing.assert_close(mine["out"], out.detach(), **close)
        torch.testing.assert_close(mine["x.grad"], x.grad, **close)
        rows = slice(rank * width, (rank + 1) * width)
        for name in ("q", "k", "v"):
            dense = getattr(attn, name)
            torch.testing.assert_close(
                mine[f"{name}.weight.grad"], dense.weight.grad[rows], **close
            )
        torch.testing.assert_close(mine["q.bias.grad"], attn.q.bias.grad[rows], **close)
        torch.testing.assert_close(
            mine["proj.weight.grad"], attn.proj.weight.grad[:, rows], **close
        )
        torch.testing.assert_close(mine["proj.bias.grad"], attn.proj.bias.grad, **close)
        assert "k.bias.grad" not in mine  # the model's key projection has no bias


# ---------------------------------------------------------------------------------------------
# The strategy through labkit.run
# ---------------------------------------------------------------------------------------------

COMMON = dict(
    model="nano",
    steps=4,
    global_batch_size=8,
    progress=False,
    max_norm=0.05,
    clip_value=0.01,
    schedule="cosine",
    warmup_steps=2,
    eval_batches=2,
)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, labkit.RunResult]:
    """single and tp, with norm clipping (tp also checkpoints) and with value clipping."""
    root = tmp_path_factory.mktemp("tp_ckpt")
    return {
        "single-norm": labkit.run(**COMMON, clip="norm"),
        "tp-norm": labkit.run(
            **COMMON,
            clip="norm",
            strategy="tp",
            world_size=2,
            checkpoint_dir=str(root),
            checkpoint_every=4,
        ),
        "single-value": labkit.run(**COMMON, clip="value"),
        "tp-value": labkit.run(**COMMON, clip="value", strategy="tp", world_size=2),
    }


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_tp_equals_single_process(tp_runs, clip):
    single, tp = tp_runs[f"single-{clip}"], tp_runs[f"tp-{clip}"]
    if clip == "norm":
        assert (single.metrics["grad_norm"] > COMMON["max_norm"]).all()  # it really clips
        # The post-clip norm is max_norm: replicated parameters were counted once, not twice.
        assert tp.metrics["grad_norm_clipped"].to_numpy() == pytest.approx(COMMON["max_norm"])
    assert tp.compare(single)["relative_difference"].max() <= 1e-5
    for rank, rows in tp.metrics.groupby("rank"):
        for column in ("loss", "grad_norm", "grad_norm_clipped"):
            assert rows[column].to_numpy() == pytest.approx(
                single.metrics[column].to_numpy(), rel=1e-5
            ), (rank, column)
    assert (tp.metrics["comm_bytes"] > 0).all()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_tp_checkpoints_shards_and_keeps_replicas_identical(tp_runs):
    tp = tp_runs["tp-norm"]
    cfg = tp.config
    local = [
        torch.load(ckpt.rank_file(cfg.checkpoint_dir, cfg.steps, r), weights_only=False)["model"]
        for r in range(2)
    ]
    full = tp.state_dict()
    assert set(local[0]) == set(local[1]) == set(full)
    sharded = {
        "blocks.0.attn.q.weight": 0,
        "blocks.1.mlp.fc.bias": 0,
        "blocks.0.mlp.proj.weight": 1,
    }
    for name, dim in sharded.items():
        assert local[0][name].shape[dim] * 2 == full[name].shape[dim]
        assert torch.equal(torch.cat([local[0][name], local[1][name]], dim=dim), full[name])
    replicated = [
        "embed.tok.weight",
        "blocks.0.ln1.weight",
        "blocks.0.attn.proj.bias",
        "head.out.weight",
    ]
    for name in replicated:
        # After 4 optimizer steps the replicas are still bitwise equal: their gradients were.
        assert torch.equal(local[0][name], local[1][name]), name
        assert torch.equal(local[0][name], full[name])


def test_tp_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="n_head"):
        labkit.TrainConfig(model="nano", strategy="tp", world_size=3)  # nano has 2 heads


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_tp_rejects_clip_methods_it_cannot_do_exactly():
    # AGC clips each output row by its own norm, but a row-parallel weight's rows are split.
    with pytest.raises((ValueError, labkit.WorkerError), match="agc"):
        labkit.run(
            model="nano",
            steps=1,
            global_batch_size=4,
            progress=False,
            strategy="tp",
            world_size=2,
            clip="agc",
        )
