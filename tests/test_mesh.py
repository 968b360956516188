"""Parallelisms combined on one mesh: dp x pp x tp, each equal to the single-process run.

Every run here uses clipping by norm with a small ``max_norm`` (it clips at every step), a
cosine schedule with warm-up, gradient accumulation, a frozen parameter and, where there is a
pipeline, two micro-batches per flush. Each data-parallel flavour appears in at least one
combination. Bad meshes are refused before any process starts.
"""

from __future__ import annotations

import pytest
import torch

import labkit
from labkit import launch
from labkit.config import TrainConfig
from labkit.parallel import presets
from labkit.parallel.mesh import group_ranks, layout, mesh_coords, mesh_rank

MAX_NORM = 0.05
BASE = dict(
    model="nano",
    steps=3,
    global_batch_size=8,
    grad_accum_steps=2,
    clip="norm",
    max_norm=MAX_NORM,
    schedule="cosine",
    warmup_steps=2,
    freeze=("embed.pos",),
    progress=False,
    timeout_s=90.0,
)
REL = 1e-5

MESHES = {
    "dp2-pp2-bucketed": dict(dp=2, pp=2, dp_impl="bucketed", micro_batches=2),
    "dp2-pp2-naive-gpipe": dict(dp=2, pp=2, dp_impl="naive", pp_schedule="gpipe", micro_batches=2),
    "dp2-pp2-zero3": dict(dp=2, pp=2, dp_impl="zero3", micro_batches=2),
    "dp2-tp2-ddp": dict(dp=2, tp=2, dp_impl="ddp"),
    "dp2-tp2-zero2": dict(dp=2, tp=2, dp_impl="zero2"),
    "dp2-tp2-fsdp": dict(dp=2, tp=2, dp_impl="fsdp"),
    "pp2-tp2-1f1b": dict(pp=2, tp=2, micro_batches=2),
    "pp2-tp2-torch": dict(pp=2, tp=2, pp_schedule="torch-1f1b", micro_batches=2),
}

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def single() -> labkit.RunResult:
    """The reference: the same configuration in one process."""
    return labkit.run(**BASE)


def assert_equivalent(single: labkit.RunResult, result: labkit.RunResult) -> None:
    """Weights, and every rank's per-step loss and grad norms, equal the single-process run's."""
    diff = single.compare(result)
    worst = diff.loc[diff["relative_difference"].idxmax()]
    assert worst["relative_difference"] <= REL, f"{worst['name']} differs: {worst.to_dict()}"
    ref = single.metrics.set_index("step")
    m = result.metrics
    assert sorted(m["rank"].unique()) == list(range(result.config.world_size))
    for rank, mine in m.groupby("rank"):
        mine = mine.set_index("step")
        for column in ("loss", "grad_norm", "grad_norm_clipped"):
            torch.testing.assert_close(
                torch.tensor(mine[column].to_numpy()),
                torch.tensor(ref[column].to_numpy()),
                rtol=REL,
                atol=0,
                msg=f"rank {rank} {column}",
            )
        assert mine["lr"].tolist() == ref["lr"].tolist()


def test_reference_really_clips(single):
    assert (single.metrics["grad_norm"] > 10 * MAX_NORM).all()


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_single_process(single, name):
    result = labkit.run(**BASE, **MESHES[name])
    assert result.config.strategy == "mesh" and result.config.world_size == 4
    assert_equivalent(single, result)
    assert (result.metrics["comm_bytes"] > 0).all()


@pytest.mark.slow
def test_three_dimensional_mesh_on_eight_ranks(single):
    # dp2 x pp2 x tp2 with ZeRO-1: the optimizer state is sharded over dp inside each stage and
    # slice, the norm combines stages and slices, the loss reduces over pp then dp.
    result = labkit.run(**BASE, dp=2, pp=2, tp=2, dp_impl="zero1", micro_batches=2)
    assert result.config.world_size == 8
    assert_equivalent(single, result)


def test_preset_composes_with_another_dimension(single):
    # "ddp" fixes dp_impl; pp=2 takes two of the four ranks, dp gets the rest.
    cfg = TrainConfig(**BASE, strategy="zero2", world_size=4, tp=2)
    assert (cfg.dp, cfg.pp, cfg.tp, cfg.dp_impl) == (2, 1, 2, "zero2")


def test_resume_is_bit_for_bit_on_dp2_pp2(tmp_path):
    kw = dict(BASE, dp=2, pp=2, micro_batches=2, steps=4)
    whole = labkit.run(**kw)
    ckpt = dict(kw, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    labkit.run(**ckpt, stop_after=2)
    resumed = labkit.run(**ckpt, resume=True)
    for key, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[key]), key
    a = whole.metrics.set_index(["step", "rank"])["loss"]
    b = resumed.metrics.set_index(["step", "rank"])["loss"]
    assert a.equals(b)


def test_zero3_resumes_from_its_shards(single, tmp_path):
    kw = dict(BASE, strategy="zero3", world_size=2, checkpoint_dir=str(tmp_path))
    labkit.run(**kw, stop_after=2, checkpoint_every=2)
    resumed = labkit.run(**kw, resume=True)
    assert_equivalent(single, resumed)


def test_zero3_peak_parameter_memory_is_measured_and_sharded():
    # The model with more modules than nano, so one module's gathered parameters are small
    # next to the whole: the peak is the shards plus the largest module, measured from the
    # storages alive at each gather.
    kw = dict(model="micro", steps=1, global_batch_size=4, progress=False, timeline=False)
    full = labkit.run(**kw).memory["peak_params_bytes"].iloc[0]
    sharded = labkit.run(**kw, strategy="zero3", world_size=2).memory
    assert len(sharded) == 2
    assert (sharded["peak_params_bytes"] < 0.6 * full).all(), sharded
    # ... and above the shards alone: the transient gathered module is in it.
    assert (sharded["peak_params_bytes"] > sharded["params_bytes"]).all()
    assert (sharded["params_bytes"] <= 0.51 * full).all()


BAD = [
    (dict(dp=3, world_size=4), "TrainConfig.world_size"),
    (dict(strategy="mesh", world_size=4), "TrainConfig.world_size"),
    (dict(pp=5), "TrainConfig.pp"),
    (dict(strategy="pp-1f1b", world_size=5), "TrainConfig.world_size"),
    (dict(tp=4), "TrainConfig.tp"),
    (dict(dp=0), "TrainConfig.dp"),
    (dict(dp=2, pp=2, micro_batches=3), "TrainConfig.micro_batches"),
    (dict(dp=2, micro_batches=2), "TrainConfig.micro_batches"),
    (dict(dp=2, pp=2, dp_impl="ddp"), "TrainConfig.dp_impl"),
    (dict(dp=2, pp=2, pp_schedule="torch-1f1b", micro_batches=2), "TrainConfig.pp_schedule"),
    (dict(pp=2, pp_schedule="torch-gpipe"), "TrainConfig.micro_batches"),
    (dict(strategy="ddp", world_size=2, dp_impl="zero1"), "TrainConfig.dp_impl"),
    (dict(dp=2, dp_impl="zero4"), "TrainConfig.dp_impl"),
    (dict(pp=2, pp_schedule="zigzag"), "TrainConfig.pp_schedule"),
    (dict(dp=2, tp=2, clip="agc"), "TrainConfig.clip"),
    (dict(strategy="zero3", world_size=2, clip="agc"), "TrainConfig.clip"),
    (dict(dp=2, pp=2, precision="fp16"), "TrainConfig.precision"),
    (dict(strategy="single", dp=2), "TrainConfig.strategy"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_mesh_is_refused_before_any_process_starts(monkeypatch, kwargs, field):
    def no_workers(*args, **kw):
        raise AssertionError("a worker was started for an invalid config")

    monkeypatch.setattr(launch, "run_on_workers", no_workers)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        labkit.run(**dict(BASE, global_batch_size=8, **kwargs))


def test_layout_puts_tp_innermost_then_dp_then_pp():
    shape = {"pp": 2, "dp": 2, "tp": 2}
    assert mesh_coords(5, shape) == {"pp": 1, "dp": 0, "tp": 1}
    for rank in range(8):
        assert mesh_rank(mesh_coords(rank, shape), shape) == rank
    assert group_ranks(shape, ("tp",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks(shape, ("dp",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks(shape, ("pp",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks(shape, ("pp", "tp")) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    table = layout(TrainConfig(model="nano", dp=2, pp=2, tp=2, global_batch_size=8))
    assert table.loc[5, "layers"] == "blocks.1 .. head"
    assert table.loc[5, "rows"] == "0..3" and table.loc[6, "rows"] == "4..7"
    assert table.loc[5, "heads"] == "1..1"


def test_every_preset_is_one_row_of_the_table():
    for name, preset in presets.PRESETS.items():
        if preset.dim is None:
            continue
        extra = dict(micro_batches=2, global_batch_size=8) if preset.dim == "pp" else {}
        cfg = TrainConfig(model="nano", strategy=name, world_size=2, **extra)
        assert getattr(cfg, preset.dim) == 2, name
        assert cfg.dp_impl == (preset.dp_impl or presets.DEFAULT_DP_IMPL)
        assert cfg.pp_schedule == (preset.pp_schedule or presets.DEFAULT_PP_SCHEDULE)
    assert TrainConfig.__dataclass_fields__["strategy"].default is None
    assert set(presets.STRATEGIES) == set(presets.PRESETS)


def test_replace_derives_the_mesh_again_unless_it_was_set():
    cfg = TrainConfig(model="nano", strategy="ddp", world_size=2)
    assert cfg.replace(world_size=4).dp == 4
    fixed = TrainConfig(model="nano", dp=2, pp=2)
    assert fixed.world_size == 4 and fixed.strategy == "mesh"
    with pytest.raises(ValueError, match=r"TrainConfig\.world_size"):
        fixed.replace(world_size=8)
    assert fixed.replace(tp=2).world_size == 8
