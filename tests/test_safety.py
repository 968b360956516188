"""Nothing lost, nobody in: checkpoints owned by one run, loopback-only rendezvous, early errors.

The data-loss cases come first: a second run into a directory must never delete or overwrite the
first run's checkpoints, and a damaged newest checkpoint must not cost more than one interval.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import psutil
import pytest
import torch

import labkit
from labkit import TrainConfig
from labkit import checkpoint as ckpt
from labkit.clip import clip_grad_norm_, clip_grad_value_
from labkit.preflight import check_world_size

TINY = dict(model="nano", global_batch_size=8, progress=False, seed=5)


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------- data loss
def test_second_run_into_a_directory_is_refused_and_the_first_run_keeps_every_file(tmp_path):
    labkit.run(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=1, **TINY)
    before = _files(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000005", "step-0000006"]
    with pytest.raises(ValueError, match="checkpoint_dir.*another run.*resume=True.*overwrite"):
        labkit.run(steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=1, **TINY)
    assert _files(tmp_path) == before
    # Without latest.json the directory still belongs to the first run: refused, nothing mixed.
    (tmp_path / "latest.json").unlink()
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="another run"):
        labkit.run(steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=1, **TINY)
    assert _files(tmp_path) == before


def test_overwrite_replaces_the_old_run_and_latest_points_at_an_existing_checkpoint(tmp_path):
    labkit.run(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=1, **TINY)
    labkit.run(steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=1, overwrite=True, **TINY)
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["step"] == 2
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000001", "step-0000002"]
    assert ckpt.rank_file(tmp_path, 2, 0).exists()
    ids = {m["run_id"] for m in ckpt.complete_checkpoints(tmp_path)}
    assert ids == {latest["run_id"]}


def test_pruning_keeps_only_the_current_runs_newest_checkpoints(tmp_path):
    # A foreign complete checkpoint (another run's id) placed in the directory is never pruned.
    first = labkit.run(
        steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=1, stop_after=2, **TINY
    )
    assert first.metrics["step"].max() == 1
    foreign = ckpt.step_dir(tmp_path, 1)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "run_id": "someone-else"}))
    labkit.run(steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=1, resume=True, **TINY)
    names = sorted(p.name for p in tmp_path.glob("step-*"))
    assert names == ["step-0000001", "step-0000003", "step-0000004"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    common = dict(steps=8, schedule="cosine", warmup_steps=2, clip="zclip", **TINY)
    full = labkit.run(**common)
    root = str(tmp_path)
    labkit.run(**common, checkpoint_dir=root, checkpoint_every=2, stop_after=6)
    newest = ckpt.rank_file(root, 6, 0)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(500))
    with pytest.warns(UserWarning, match=f"step 6 cannot be loaded.*{newest.name}"):
        resumed = labkit.run(**common, checkpoint_dir=root, checkpoint_every=2, resume=True)
    # It resumed from step 4, the previous complete checkpoint, and equals the uninterrupted run.
    assert resumed.metrics["step"].tolist() == list(range(8))
    for column in ("loss", "lr", "grad_norm"):
        assert resumed.metrics[column].tolist() == full.metrics[column].tolist(), column
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_malformed_latest_json_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = str(tmp_path)
    labkit.run(steps=6, checkpoint_dir=root, checkpoint_every=2, stop_after=4, **TINY)
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.warns(
        UserWarning, match="latest.json is not a valid checkpoint pointer; using step 4"
    ):
        resumed = labkit.run(steps=6, checkpoint_dir=root, checkpoint_every=2, resume=True, **TINY)
    assert resumed.metrics["step"].tolist() == list(range(6))


def test_nothing_loadable_is_a_clear_error_naming_the_directory(tmp_path):
    root = str(tmp_path)
    labkit.run(steps=4, checkpoint_dir=root, checkpoint_every=2, **TINY)
    for path in tmp_path.glob("step-*/rank0.pt"):
        path.write_bytes(b"garbage")
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match="no checkpoint in .* can be loaded"),
    ):
        labkit.run(steps=6, checkpoint_dir=root, checkpoint_every=2, resume=True, **TINY)


# ---------------------------------------------------------------------- security
class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    root = tmp_path / "run"
    common = dict(steps=6, checkpoint_dir=str(root), checkpoint_every=2, **TINY)
    labkit.run(**common, stop_after=4)
    marker = tmp_path / "pwned"
    torch.save({"model": _Exploit(str(marker))}, ckpt.rank_file(root, 4, 0))
    with pytest.raises(ValueError, match="cannot load checkpoint file .*rank0.pt"):
        ckpt.load_rank(root, 4, 0)
    with pytest.warns(UserWarning, match="step 4 cannot be loaded.*rank0.pt.*Unpickl"):
        resumed = labkit.run(**common, resume=True)
    assert not marker.exists()
    assert resumed.metrics["step"].tolist() == list(range(6))  # resumed from step 2 instead


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


@pytest.mark.distributed
def test_a_local_multi_process_run_listens_on_loopback_only():
    seen: set[tuple[str, int]] = set()
    worker_pids: set[int] = set()
    done = threading.Event()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            labkit.run(strategy="ddp", world_size=2, steps=40, **TINY)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    me = psutil.Process()
    while not done.wait(0.05):
        kids = {p.pid for p in me.children(recursive=True)}
        worker_pids |= kids
        seen |= _listening(kids | {me.pid})
    thread.join(60)
    assert not errors, errors
    assert worker_pids, "the run started no worker processes"
    assert seen, "no listening socket was seen: Gloo's pairs were not observed"
    assert {ip for ip, _ in seen} <= {"127.0.0.1", "::1"}, seen


# ---------------------------------------------------------------------- work lost at the end
def test_cli_checks_the_csv_path_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "labkit", "train", "--model", "nano", "--steps", "50"]
        + ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1"]
        + ["--csv", "/no/such/dir/x.csv", "--progress", "false"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--csv" in proc.stderr and "/no/such/dir" in proc.stderr
    assert not (tmp_path / "ck").exists()  # nothing trained


def test_unwritable_or_non_path_checkpoint_dir_fails_before_training(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir.*is a file"):
        labkit.run(steps=2, checkpoint_dir=str(a_file), checkpoint_every=1, **TINY)
    with pytest.raises(ValueError, match="checkpoint_dir.*not a writable directory"):
        labkit.run(steps=2, checkpoint_dir=str(a_file / "sub"), checkpoint_every=1, **TINY)
    with pytest.raises(ValueError, match="checkpoint_dir=3"):
        TrainConfig(checkpoint_dir=3, **TINY)
    # A PathLike is accepted and stored as a string (it goes into JSON metadata).
    assert TrainConfig(checkpoint_dir=tmp_path / "ok", **TINY).checkpoint_dir == str(
        tmp_path / "ok"
    )


# ---------------------------------------------------------------------- no silent override
@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("peak_lr", "lr"),
        ("total_steps", "steps"),
        ("warmup_steps", "warmup_steps"),
        ("min_lr", "min_lr"),
    ],
)
def test_schedule_kwargs_may_not_set_what_a_field_sets(key, field):
    with pytest.raises(ValueError, match=f"schedule_kwargs.*'{key}' is set by TrainConfig.{field}"):
        TrainConfig(schedule="cosine", schedule_kwargs={key: 5}, **TINY)


def test_a_config_cannot_be_changed_behind_validation():
    cfg = TrainConfig(**TINY)
    with pytest.raises(AttributeError):
        cfg.steps = -1
    with pytest.raises(ValueError, match="TrainConfig.steps=-1"):
        cfg.replace(steps=-1)
    # The one mutable field, a dict, is re-validated where it is consumed.
    cfg = TrainConfig(schedule="cosine", **TINY)
    cfg.schedule_kwargs["peak_lr"] = 50.0
    with pytest.raises(ValueError, match="peak_lr"):
        labkit.run(cfg, steps=1)


# ---------------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: labkit.run(steps=1, freeze=("embed", "blocks", "head"), **TINY), "freezes every"),
        (
            lambda: labkit.run(steps=1, strategy="ddp", world_size=2, freeze=("nope",), **TINY),
            "'nope' matches no",
        ),
        (lambda: TrainConfig(seed=2**64), "TrainConfig.seed"),
        (lambda: labkit.run("nano"), "first argument must be a TrainConfig.*model='nano'"),
        (lambda: TrainConfig(unknown=1), "unknown TrainConfig field.*unknown"),
        (lambda: TrainConfig("nano"), "keyword arguments only"),
        (
            lambda: TrainConfig(resume=True, overwrite=True, checkpoint_dir="x"),
            "TrainConfig.overwrite",
        ),
        (lambda: TrainConfig(freeze=3), "TrainConfig.freeze"),
        (lambda: TrainConfig(schedule_kwargs=[1]), "TrainConfig.schedule_kwargs"),
    ],
)
def test_bad_input_gets_a_value_error_naming_the_field(call, match):
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # e.g. multiprocessing's tracker
    with pytest.raises(ValueError, match=match):
        call()
    started = {p.pid for p in me.children(recursive=True)} - before
    assert not started, "a process was started before the error"


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), "1"])
def test_non_positive_clip_thresholds_raise(bad):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], bad)
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value_([p], bad)
    assert torch.equal(p.grad, torch.ones(3))  # nothing was touched


# ---------------------------------------------------------------------- warnings
def test_resuming_from_an_empty_or_missing_directory_warns(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.warns(UserWarning, match="holds no checkpoint; the run starts from step 0"):
            labkit.run(steps=1, checkpoint_dir=str(root), resume=True, **TINY)


def test_a_run_that_skipped_every_step_warns(monkeypatch):
    original = labkit.launch.Trainer

    class Poisoned(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            weight = self.strategy.module.head.out.weight
            weight.register_hook(lambda g: g * float("nan"))

    monkeypatch.setattr(labkit.launch, "Trainer", Poisoned)
    with pytest.warns(UserWarning, match="every one of the 3 steps was skipped"):
        result = labkit.run(steps=3, **TINY)
    assert result.info["skipped_steps"] == 3
    monkeypatch.setattr(labkit.launch, "Trainer", original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labkit.run(steps=2, **TINY)  # a healthy run says nothing


def test_a_world_size_the_machine_cannot_hold_warns():
    with pytest.warns(UserWarning, match="world_size=64 starts 64 processes"):
        check_world_size(TrainConfig(strategy="dp-naive", world_size=64, global_batch_size=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_world_size(TrainConfig(strategy="dp-naive", world_size=8, global_batch_size=8))
