"""Checkpoints: one file per rank per step, written atomically, owned by one run.

Layout of ``checkpoint_dir``::

    step-0000004/rank0.pt, rank1.pt, ...   each rank's state after 4 optimizer steps
    step-0000004/meta.json                 written last, after every rank's file: "complete"
    latest.json                            points at the newest complete checkpoint

Atomic means: write to a temporary file in the same directory, flush it to disk, ``os.replace`` it
over the final name, then fsync the directory so the rename itself survives a power cut. A crash
mid-write leaves the previous checkpoint intact; a reader never sees half a file.

A directory belongs to one run. ``meta.json`` and ``latest.json`` carry a ``run_id``; a run that
resumes adopts the id it finds, any other run is refused (``preflight``) unless it asked to
``overwrite``. Pruning only removes complete checkpoints of the current run, oldest first, after a
newer one is complete, so two runs can never delete each other's files.

Files are read with ``torch.load(weights_only=True)``: a checkpoint is tensors and plain values,
never code, so a crafted file cannot run anything when a user resumes from it. A file that does
not load (truncated, garbage, or asking for code) makes the loader fall back to the previous
complete checkpoint, with a warning naming the bad file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

KEEP = 2  # complete checkpoints kept on disk; older ones are removed after a new one lands
# Fields that must match between a checkpoint and the run resuming from it.
STRUCTURAL_FIELDS = (
    "model",
    "norm",
    "block_size",
    "vocab_size",
    "corpus",
    "strategy",
    "world_size",
    "dp",  # the mesh: each rank's file holds its own stage, slice and shard
    "pp",
    "tp",
    "cp",
    "dp_impl",
    "pp_balance",
    "pp_virtual_stages",  # the chunks each rank holds
    "micro_batches",
    "optimizer",
    "freeze",
)
# Fields newer than some checkpoints: a checkpoint without one was written with this value.
ADDED_LATER = {"pp_virtual_stages": 1, "cp": 1, "vocab_size": None}


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used as asked (another run's, or nothing loadable)."""


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk (POSIX; a no-op elsewhere).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename, fsync of the directory)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, indent=1, default=str).encode()
    _atomic_write(path, lambda f: f.write(data))


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """Directory of the checkpoint taken after ``step`` optimizer steps."""
    return Path(root) / f"step-{step:07d}"


def rank_file(root: str | os.PathLike, step: int, rank: int) -> Path:
    """One rank's file inside a checkpoint."""
    return step_dir(root, step) / f"rank{rank}.pt"


def new_run_id() -> str:
    """A fresh identity for a run's checkpoints."""
    return uuid.uuid4().hex


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if missing or not a readable JSON object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("step"), int) else None


def complete_checkpoints(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Metadata of every complete checkpoint in ``root`` (those with a ``meta.json``), by step."""
    found = []
    for path in Path(root).glob("step-*"):
        meta = _read_json(path / "meta.json") if path.is_dir() else None
        if meta is not None:
            found.append(meta)
    return sorted(found, key=lambda m: m["step"])


def holds_checkpoints(root: str | os.PathLike) -> bool:
    """True when ``root`` holds any checkpoint file or pointer (complete or not)."""
    path = Path(root)
    return path.is_dir() and (
        (path / "latest.json").exists() or any(p.is_dir() for p in path.glob("step-*"))
    )


def write_latest(
    root: str | os.PathLike, step: int, config: dict[str, Any], run_id: str | None = None
) -> None:
    """Mark the checkpoint of ``step`` complete, point ``latest.json`` at it, prune (rank 0 only).

    Call after every rank's file of ``step`` is on disk.
    """
    meta = {"step": step, "run_id": run_id, "config": config}
    _write_json(step_dir(root, step) / "meta.json", meta)
    _write_json(Path(root) / "latest.json", meta)
    mine = [m["step"] for m in complete_checkpoints(root) if m.get("run_id") == run_id]
    for old in [s for s in mine if s < step][: max(0, len(mine) - KEEP)]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    _fsync_dir(Path(root))


def read_latest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata (step, run_id, config) of the newest complete checkpoint, or None.

    ``latest.json`` when it is readable; otherwise (deleted, malformed) the newest step directory
    with a ``meta.json``, with a warning.
    """
    path = Path(root) / "latest.json"
    meta = _read_json(path)
    if meta is not None:
        return meta
    found = complete_checkpoints(root)
    if path.exists():
        fallback = f"using step {found[-1]['step']}" if found else "no complete checkpoint found"
        warnings.warn(f"{path} is not a valid checkpoint pointer; {fallback}", stacklevel=2)
    return found[-1] if found else None


def check_compatible(root: str | os.PathLike, config: dict[str, Any]) -> int | None:
    """Validate that a run with ``config`` can resume from ``root``; return the step, or None.

    Raises ValueError naming the first structural field that differs (a different model or
    strategy cannot load these tensors), before any process is started.
    """
    meta = read_latest(root)
    if meta is None:
        return None
    saved = meta.get("config") or {}
    names = STRUCTURAL_FIELDS + (("bucket_mb",) if config.get("dp_impl") == "zero2" else ())
    for name in names:
        a, b = saved.get(name, ADDED_LATER.get(name)), config.get(name)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            raise ValueError(
                f"TrainConfig.resume: the checkpoint in {root} was written with {name}={a!r}, "
                f"this run has {name}={b!r}; resume with the same {name} or another checkpoint_dir"
            )
    # Which chunks a rank holds: ZBV places them in a V, every other schedule at c * pp + rank.
    if config.get("pp", 1) > 1 and config.get("pp_virtual_stages", 1) > 1:
        if (saved.get("pp_schedule") == "torch-zbv") != (config.get("pp_schedule") == "torch-zbv"):
            raise ValueError(
                f"TrainConfig.resume: the checkpoint in {root} was written with pp_schedule="
                f"{saved.get('pp_schedule')!r}, whose ranks hold other chunks than this run's "
                f"pp_schedule={config.get('pp_schedule')!r}; resume with a schedule of the same "
                "chunk placement or another checkpoint_dir"
            )
    step = int(meta["step"])
    if step > config["steps"]:
        raise ValueError(
            f"TrainConfig.steps={config['steps']} is below the checkpoint's step {step} in {root}"
        )
    return step


def preflight(root: str | os.PathLike | None, *, resume: bool, overwrite: bool) -> None:
    """Check ``checkpoint_dir`` before launch: writable, and not another run's (unless asked).

    - not resuming into a directory that holds checkpoints: CheckpointError, unless
      ``overwrite``, in which case the old checkpoints are removed now (the user chose so);
    - resuming from a missing or empty directory: a warning (the run starts at step 0);
    - a path that is a file, or a directory this process cannot write: ValueError.
    """
    if root is None:
        return
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise ValueError(f"TrainConfig.checkpoint_dir={str(root)!r} is a file, not a directory")
    if holds_checkpoints(path) and not resume:
        if not overwrite:
            raise CheckpointError(
                f"TrainConfig.checkpoint_dir={str(root)!r} holds the checkpoints of another run; "
                "pass resume=True to continue it, overwrite=True to replace it, or choose "
                "another checkpoint_dir"
            )
        for old in path.glob("step-*"):
            shutil.rmtree(old, ignore_errors=True)
        (path / "latest.json").unlink(missing_ok=True)
    if resume and not complete_checkpoints(path) and _read_json(path / "latest.json") is None:
        warnings.warn(
            f"TrainConfig.resume: {str(root)!r} holds no checkpoint; the run starts from step 0",
            stacklevel=3,
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(
            f"TrainConfig.checkpoint_dir={str(root)!r} is not a writable directory: "
            f"{err.strerror or err}"
        ) from None


def _load(path: Path) -> dict[str, Any]:
    # weights_only: tensors, containers and numbers only; a pickled callable is refused.
    return torch.load(path, map_location="cpu", weights_only=True)


def loadable_step(root: str | os.PathLike, world_size: int, newest: int) -> int | None:
    """The newest complete step at or below ``newest`` whose every rank file loads; None if none.

    Each skipped checkpoint gets a warning naming the file that failed and why.
    """
    steps = sorted(
        (m["step"] for m in complete_checkpoints(root) if m["step"] <= newest), reverse=True
    )
    if newest not in steps and step_dir(root, newest).is_dir():
        steps.insert(0, newest)  # an old-format checkpoint: latest.json only, no meta.json
    for step in steps:
        bad = None
        for rank in range(world_size):
            path = rank_file(root, step, rank)
            try:
                _load(path)
            except Exception as err:  # noqa: BLE001 (any unreadable file means: fall back)
                bad = f"{path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                break
        if bad is None:
            return step
        warnings.warn(
            f"checkpoint of step {step} cannot be loaded ({bad}); trying an older one",
            stacklevel=2,
        )
    return None


def load_rank(root: str | os.PathLike, step: int, rank: int) -> dict[str, Any]:
    """Load one rank's state from the checkpoint of ``step`` (tensors and plain values only)."""
    path = rank_file(root, step, rank)
    try:
        return _load(path)
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint file {path}: {err}") from err
