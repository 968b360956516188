"""The training loop: resume, accumulation, schedules per optimizer step, non-finite gradients."""

import json

import numpy as np
import pytest
import torch

import labkit
from labkit import TrainConfig
from labkit.parallel.base import DistContext
from labkit.train import Trainer

TINY = dict(model="nano", global_batch_size=8, progress=False, seed=3)


def test_training_lowers_the_loss():
    result = labkit.run(steps=40, lr=1e-2, eval_every=20, **TINY)
    losses = result.losses
    assert losses.iloc[-5:].mean() < losses.iloc[:5].mean() - 0.5
    val = result.metrics["val_loss"].dropna()
    assert len(val) == 2 and val.iloc[-1] < val.iloc[0]
    for column in ("step", "rank", "loss", "lr", "grad_norm", "grad_norm_clipped", "step_time_s"):
        assert column in result.metrics
    assert (result.metrics["tokens_per_s"] > 0).all()


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    common = dict(
        steps=12,
        schedule="cosine",
        warmup_steps=3,
        clip="autoclip",  # stateful clipper: its norm history must survive the checkpoint too
        checkpoint_dir=str(tmp_path),
        **TINY,
    )
    full = labkit.run(**{**common, "checkpoint_dir": str(tmp_path / "full")})
    first = labkit.run(**common, checkpoint_every=5, stop_after=7)
    assert len(first.metrics) == 7
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["step"] == 7
    resumed = labkit.run(**common, checkpoint_every=5, resume=True)
    # Bit for bit: the same losses, LRs, norms and final weights.
    for column in ("loss", "lr", "grad_norm", "grad_norm_clipped"):
        assert resumed.metrics[column].tolist() == full.metrics[column].tolist(), column
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Atomic writes leave no temporary files behind.
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_with_another_model_is_refused_before_launch(tmp_path):
    labkit.run(steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=2, **TINY)
    with pytest.raises(ValueError, match="model"):
        labkit.run(**{**TINY, "model": "micro"}, steps=4, checkpoint_dir=str(tmp_path), resume=True)


def test_gradient_accumulation_matches_one_big_batch_and_lr_steps_per_optimizer_step():
    common = dict(steps=6, schedule="linear", warmup_steps=2, **TINY)
    big = labkit.run(**common)
    accum = labkit.run(**common, grad_accum_steps=4)
    assert big.compare(accum)["relative_difference"].max() < 1e-5
    # One LR per optimizer step, the same as without accumulation (not one per micro-batch).
    assert accum.metrics["lr"].tolist() == big.metrics["lr"].tolist()
    assert len(accum.metrics) == 6
    forwards = accum.timeline[accum.timeline["phase"] == "forward"]
    assert forwards.groupby("step").size().tolist() == [4] * 6


def _poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make one gradient NaN on the given steps (a hook on a parameter)."""
    param = trainer.strategy.module.head.out.weight
    param.register_hook(lambda g: g * float("nan") if trainer.step in bad_steps else g)


def test_nonfinite_gradients_are_skipped_and_counted():
    trainer = Trainer(TrainConfig(steps=5, nonfinite="skip", **TINY), DistContext())
    _poison(trainer, {2})
    before = {}
    rows = []
    for step in range(5):
        if step == 2:
            before = {k: v.clone() for k, v in trainer.strategy.module.state_dict().items()}
        rows.append(trainer.train_step())
        if step == 2:
            after = trainer.strategy.module.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert trainer.skipped == 1
    assert all(torch.isfinite(p).all() for p in trainer.strategy.module.parameters())


def test_nonfinite_gradients_raise_when_asked():
    trainer = Trainer(TrainConfig(steps=3, nonfinite="raise", **TINY), DistContext())
    _poison(trainer, {1})
    trainer.train_step()
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.train_step()


def test_frozen_parameter_does_not_move():
    result = labkit.run(steps=3, freeze=("embed.pos",), **TINY)
    init = labkit.train.build_model(TrainConfig(**TINY)).state_dict()
    assert torch.equal(result.state_dict()["embed.pos.weight"], init["embed.pos.weight"])
    assert not torch.equal(result.state_dict()["embed.tok.weight"], init["embed.tok.weight"])
    with pytest.raises(ValueError, match="freeze"):
        labkit.run(steps=1, freeze=("no.such.layer",), **TINY)


def test_fp16_loss_scaling_unscales_before_clipping():
    # The GradScaler multiplies the loss by 2**16; clipping must see the true gradient norm.
    fp32 = labkit.run(steps=3, **TINY)
    fp16 = labkit.run(steps=3, precision="fp16", **TINY)
    ratio = fp16.metrics["grad_norm"] / fp32.metrics["grad_norm"]
    assert ratio.between(0.98, 1.02).all(), ratio.tolist()
    assert (fp16.metrics["grad_norm_clipped"] <= 1.0 + 1e-4).all()


@pytest.mark.parametrize("strategy", ["single", "ddp"])
def test_bf16_trains_on_cpu_with_a_finite_falling_loss(strategy):
    world = 1 if strategy == "single" else 2
    run = labkit.run(
        model="nano",
        steps=8,
        global_batch_size=8,
        lr=3e-3,
        precision="bf16",
        strategy=strategy,
        world_size=world,
        progress=False,
    )
    loss = run.losses
    assert loss.notna().all() and np.isfinite(loss.to_numpy()).all()
    assert loss.iloc[-1] < loss.iloc[0]


def test_fp16_overflow_skips_exactly_that_step_and_the_schedule_goes_on():
    kw = dict(TINY, steps=4, precision="fp16", schedule="cosine", warmup_steps=1)
    clean = labkit.run(**kw)
    hit = labkit.run(**kw, fault="overflow:0:2")
    assert hit.metrics["skipped"].tolist() == [False, False, True, False]
    assert hit.info["skipped_steps"] == 1
    scale = hit.metrics["loss_scale"].tolist()  # the scaler halves its scale on the overflow
    assert scale[2] == scale[1] / 2 and scale[3] == scale[2]
    assert hit.metrics["lr"].tolist() == clean.metrics["lr"].tolist()
    # Until the overflow the runs are the same; the skipped step left the weights as they were.
    assert hit.metrics["loss"].tolist()[:3] == clean.metrics["loss"].tolist()[:3]


def test_vocab_size_pads_embedding_and_head_and_still_trains():
    run = labkit.run(model="nano", steps=3, global_batch_size=4, vocab_size=512, progress=False)
    state = run.state_dict()
    assert state["embed.tok.weight"].shape[0] == state["head.out.weight"].shape[0] == 512
    assert run.losses.notna().all()


def test_vocab_size_smaller_than_the_corpus_is_refused_before_launch(monkeypatch):
    from labkit import launch

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launch, "run_on_workers", no_workers)
    with pytest.raises(ValueError, match=r"TrainConfig\.vocab_size=10 is invalid: corpus"):
        labkit.run(model="nano", strategy="ddp", world_size=2, vocab_size=10, progress=False)
