"""Checks made before any process starts, so a run never trains for minutes and then loses its work.

``TrainConfig`` validates its own fields. What it cannot know without looking at the world is
checked here, in the caller's process, right before launch:

- the config is valid *now* (re-validated where it is consumed, whatever happened to it since),
- ``checkpoint_dir`` is a writable directory that does not hold another run's checkpoints,
- ``vocab_size``, if set, holds every character of the corpus,
- ``freeze`` prefixes match some, but not all, of the model's parameters,
- the machine can plausibly hold ``world_size`` processes (a warning, not an error).

``check_output_file`` does the same for files written at the end of a run (the CLI's CSV).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from labkit import checkpoint as ckpt
from labkit.config import TrainConfig

# Rough resident size of one idle worker (torch, the corpus, a small model): for the warning only.
WORKER_BYTES = 300 * 2**20


def parameter_names(cfg: TrainConfig) -> list[str]:
    """The names of the model's parameters, built on the meta device (no memory, no init)."""
    from labkit.model import GPT, model_config

    mcfg = model_config(cfg.model, vocab_size=2, norm=cfg.norm, block_size=cfg.block_size)
    with torch.device("meta"):
        return [name for name, _ in GPT(mcfg).named_parameters()]


def check_freeze(cfg: TrainConfig) -> None:
    """Every ``freeze`` prefix matches a parameter, and at least one parameter still trains."""
    if not cfg.freeze:
        return
    names = parameter_names(cfg)
    for prefix in cfg.freeze:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(
                f"TrainConfig.freeze: {prefix!r} matches no parameter of model {cfg.model!r} "
                f"(its parameters start with: {', '.join(sorted({n.split('.')[0] for n in names}))})"
            )
    if all(any(n.startswith(p) for p in cfg.freeze) for n in names):
        raise ValueError(
            f"TrainConfig.freeze={cfg.freeze!r} freezes every parameter of model {cfg.model!r}: "
            "nothing would train; freeze fewer prefixes"
        )


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_world_size(cfg: TrainConfig) -> None:
    """Warn when ``world_size`` processes will crowd this machine (legal, probably a mistake)."""
    if cfg.strategy == "single":
        return
    cores = os.cpu_count() or 1
    need = cfg.world_size * WORKER_BYTES
    memory = _memory_bytes()
    if cfg.world_size > max(8, 4 * cores) or (memory is not None and need > memory // 2):
        mem = f" of {memory / 2**30:.0f} GiB" if memory else ""
        warnings.warn(
            f"TrainConfig.world_size={cfg.world_size} starts {cfg.world_size} processes on "
            f"{cores} CPU core(s) (about {need / 2**30:.1f} GiB{mem}); expect it to be slow or "
            "run out of memory. 2-8 ranks are enough for every lesson.",
            stacklevel=3,
        )


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Raise ValueError unless ``path`` can be written (its directory exists and is writable)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{what}={str(path)!r} is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{what}={str(path)!r}: the directory {str(parent)!r} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ValueError(
            f"{what}={str(path)!r}: cannot write in {str(parent)!r} ({err.strerror or err})"
        ) from None


def preflight(cfg: TrainConfig) -> None:
    """Every check above, in the order a user would want to hear about them."""
    cfg.validate()
    if cfg.vocab_size is not None:
        from labkit.data import model_vocab_size

        model_vocab_size(cfg.corpus, cfg.vocab_size)
    check_freeze(cfg)
    ckpt.preflight(cfg.checkpoint_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        ckpt.check_compatible(cfg.checkpoint_dir, cfg.to_dict())
    check_world_size(cfg)
