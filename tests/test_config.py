"""TrainConfig rejects bad values before anything starts, naming the field."""

import pytest

import labkit
from labkit import TrainConfig

INVALID = [
    ({"model": "gigantic"}, "model"),
    ({"strategy": "magic"}, "strategy"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": True}, "steps"),
    ({"global_batch_size": -4}, "global_batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"beta2": 1.0}, "beta2"),
    ({"clip": "sometimes"}, "clip"),
    ({"max_norm": -1.0}, "max_norm"),
    ({"autoclip_percentile": 0}, "autoclip_percentile"),
    ({"autoclip_percentile": 150}, "autoclip_percentile"),
    ({"nonfinite": "ignore"}, "nonfinite"),
    ({"warmup_steps": 500, "steps": 100}, "warmup_steps"),
    ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
    ({"strategy": "single", "world_size": 2}, "world_size"),
    (
        {"strategy": "ddp", "world_size": 2, "global_batch_size": 3, "grad_accum_steps": 2},
        "global_batch_size",
    ),
    ({"micro_batches": 4}, "micro_batches"),
    (
        {"strategy": "pp-1f1b", "world_size": 2, "global_batch_size": 10, "micro_batches": 4},
        "micro_batches",
    ),
    ({"strategy": "pp-gpipe", "world_size": 9, "model": "nano"}, "world_size"),
    ({"strategy": "tp", "world_size": 3, "model": "nano"}, "world_size"),
    ({"backend": "nccl", "device": "cpu"}, "backend"),
    ({"device": "tpu"}, "device"),
    ({"resume": True}, "resume"),
    ({"checkpoint_every": 5}, "checkpoint_every"),
    ({"stop_after": 300, "steps": 100}, "stop_after"),
    ({"fault": "explode:0:1"}, "fault"),
    ({"schedule": "zigzag"}, "schedule"),
    ({"precision": "fp8"}, "precision"),
]


@pytest.mark.parametrize(("kwargs", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_value_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_run_validates_before_starting_processes(monkeypatch):
    # If validation happened after the launch, this would try to spawn workers.
    import labkit.launch

    def no_launch(cfg):
        raise AssertionError("a process was started for an invalid config")

    monkeypatch.setattr(labkit.launch, "launch", no_launch)
    with pytest.raises(ValueError, match="world_size"):
        labkit.run(strategy="ddp", world_size=0)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="warmup_stpes"):
        labkit.run(warmup_stpes=10)


def test_valid_config_round_trips():
    cfg = TrainConfig(model="nano", strategy="ddp", world_size=2, freeze="embed.pos")
    assert cfg.freeze == ("embed.pos",)
    assert cfg.replace(steps=7).steps == 7
    assert cfg.dp_size == 2


def test_parallel_specific_rules():
    with pytest.raises(ValueError, match="micro_batches"):
        TrainConfig(model="nano", strategy="pp-torch", world_size=2, micro_batches=1)
    with pytest.raises(ValueError, match="clip"):
        TrainConfig(model="nano", strategy="tp", world_size=2, clip="agc")
