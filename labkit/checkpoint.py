"""Checkpoints: one file per rank per step, written atomically, plus a ``latest.json`` pointer.

Atomic means: write to a temporary file in the same directory, flush it to disk, then
``os.replace`` it over the final name. A crash mid-write leaves the previous checkpoint intact;
a reader never sees half a file. ``latest.json`` is written last (after every rank's file is on
disk), so it only ever points at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

KEEP = 2  # complete checkpoints kept on disk; older ones are removed after a new one lands
# Fields that must match between a checkpoint and the run resuming from it.
STRUCTURAL_FIELDS = (
    "model",
    "norm",
    "block_size",
    "corpus",
    "strategy",
    "world_size",
    "micro_batches",
    "optimizer",
    "freeze",
)


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


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """Directory of the checkpoint taken after ``step`` optimizer steps."""
    return Path(root) / f"step-{step:07d}"


def rank_file(root: str | os.PathLike, step: int, rank: int) -> Path:
    """One rank's file inside a checkpoint."""
    return step_dir(root, step) / f"rank{rank}.pt"


def write_latest(root: str | os.PathLike, step: int, config: dict[str, Any]) -> None:
    """Point ``latest.json`` at the checkpoint of ``step`` and prune old ones (rank 0 only)."""
    meta = {"step": step, "config": config}
    data = json.dumps(meta, indent=1, default=str).encode()
    _atomic_write(Path(root) / "latest.json", lambda f: f.write(data))
    steps = sorted(int(p.name.split("-")[1]) for p in Path(root).glob("step-*") if p.is_dir())
    for old in steps[:-KEEP]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)


def read_latest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The ``latest.json`` metadata (step and config), or None when there is no checkpoint."""
    path = Path(root) / "latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_compatible(root: str | os.PathLike, config: dict[str, Any]) -> int | None:
    """Validate that a run with ``config`` can resume from ``root``; return the step, or None.

    Raises ValueError naming the first structural field that differs (a different model or
    strategy cannot load these tensors), before any process is started.
    """
    meta = read_latest(root)
    if meta is None:
        return None
    saved = meta["config"]
    for name in STRUCTURAL_FIELDS:
        a, b = saved.get(name), config.get(name)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            raise ValueError(
                f"TrainConfig.resume: the checkpoint in {root} was written with {name}={a!r}, "
                f"this run has {name}={b!r}; resume with the same {name} or another checkpoint_dir"
            )
    step = int(meta["step"])
    if step > config["steps"]:
        raise ValueError(
            f"TrainConfig.steps={config['steps']} is below the checkpoint's step {step} in {root}"
        )
    return step


def load_rank(root: str | os.PathLike, step: int, rank: int) -> dict[str, Any]:
    """Load one rank's state from the checkpoint of ``step``."""
    return torch.load(rank_file(root, step, rank), map_location="cpu", weights_only=False)
