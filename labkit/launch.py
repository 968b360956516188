"""Start worker processes, watch them, collect their results: ``labkit.run``.

From a notebook cell or the command line, ``run(strategy="ddp", world_size=2)`` starts two real
processes with ``torch.multiprocessing``'s *spawn* method. The worker entry (``_worker``) lives in
this importable module, so nothing defined in a notebook has to be pickled.

Rendezvous goes through a ``FileStore`` in a private temporary directory of the run (mode 0700),
not a TCP port: nothing of a local run listens on the network, two runs at once can never collide,
and no other user can join or disturb one. Gloo's own connections between the ranks are pinned to
the loopback interface. (Under ``torchrun`` the user's rendezvous choice stands.)

The parent watches its children. If one raises, it writes its traceback to a file and exits; if
one is killed, its exit code says by which signal. Either way the parent stops the other ranks
(they would otherwise wait forever in a collective), removes every process, and raises
``WorkerError`` naming the rank and its exception, within about a second. Children also ask the
kernel to kill them if the parent dies (``PR_SET_PDEATHSIG``), so no orphan outlives a crashed
kernel. Under ``torchrun`` the same per-rank code runs through ``run_under_torchrun``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labkit import checkpoint as ckpt
from labkit.config import TrainConfig, make_config
from labkit.parallel.base import DistContext
from labkit.preflight import preflight
from labkit.result import RunResult
from labkit.train import Trainer, shared_clock, train

LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"  # the loopback interface's name
POLL_S = 0.05  # how often the parent looks at its children
GRACE_S = 1.0  # after a failure, how long peers get to report their own errors before being killed


class WorkerError(RuntimeError):
    """A worker rank failed; ``rank`` is the rank, ``detail`` its exception or exit signal."""

    def __init__(self, rank: int, detail: str, log_tail: str = "") -> None:
        self.rank, self.detail, self.log_tail = rank, detail, log_tail
        message = f"rank {rank} failed: {detail}"
        if log_tail:
            message += f"\n--- last lines of rank {rank}'s log ---\n{log_tail}"
        super().__init__(message)


def resolve_device(cfg: TrainConfig) -> tuple[str, str]:
    """(device type, backend) for ``cfg``: CUDA + NCCL when GPUs are present, else CPU + Gloo."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.backend != "auto":
        backend = cfg.backend
    else:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda and cfg.world_size > torch.cuda.device_count() and cfg.strategy != "single":
        if cfg.device == "cuda":
            raise ValueError(
                f"TrainConfig.world_size={cfg.world_size} is invalid: only "
                f"{torch.cuda.device_count()} GPU(s) visible; use device='cpu' for more ranks"
            )
        use_cuda, backend = False, "gloo" if cfg.backend == "auto" else backend
    return ("cuda" if use_cuda else "cpu"), backend


def threads_per_rank(cfg: TrainConfig) -> int:
    """CPU threads for each rank: the total (``cfg.threads`` or all cores) split evenly."""
    total = cfg.threads or os.cpu_count() or 1
    return max(1, total // cfg.world_size)


def run_rank(cfg: TrainConfig, ctx: DistContext, on_step: Any = None) -> dict[str, Any] | None:
    """Train on this rank and gather every rank's rows to rank 0 (which returns them)."""
    t0 = shared_clock(ctx)
    out = train(cfg, ctx, on_step=on_step, t0=t0)
    payload = (out.metrics, out.timeline, out.layer_norms)
    gathered: list[Any] = [None] * ctx.world_size if ctx.rank == 0 else []
    dist.gather_object(payload, gathered if ctx.rank == 0 else None, dst=0)
    if ctx.rank != 0:
        return None
    return {
        "metrics": [row for m, _, _ in gathered for row in m],
        "timeline": [row for _, t, _ in gathered for row in t],
        "layer_norms": [row for _, _, n in gathered for row in n],
        "info": out.info,
        "state": out.state,
    }


# ---------------------------------------------------------------------- inside a worker
def _die_with_parent() -> None:
    # Linux: the kernel sends SIGKILL to this process when its parent exits, however it exits.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _entry(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    store_path: str,
    outdir: str,
    backend: str,
    timeout_s: float,
    threads: int,
) -> None:
    """A spawned worker: join the process group, run ``fn``, hand its result back in a file."""
    _die_with_parent()
    # Local ranks talk over loopback only: Gloo would otherwise bind to the host name's address.
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    out = Path(outdir)
    log = open(out / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115 (lives as long as the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    torch.set_num_threads(threads)
    try:
        timeout = timedelta(seconds=timeout_s)
        store = dist.FileStore(store_path, world_size)
        store.set_timeout(timeout)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        result = fn(rank, world_size, *args)
        ckpt.save_atomic(result, out / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 (every failure must reach the parent)
        record = {
            "type": type(err).__name__,
            "message": str(err),
            "traceback": traceback.format_exc(),
            "time": time.time(),
        }
        (out / f"rank{rank}.error.json").write_text(json.dumps(record))
        log.flush()
        os._exit(1)  # skip atexit/NCCL teardown that could hang on a broken group
    log.flush()
    # Skip interpreter teardown: c10d's background threads occasionally abort in it
    # ("terminate called without an active exception", ~1 run in 20), after all work is done.
    os._exit(0)


def _train_worker(
    rank: int, world_size: int, configs: list[TrainConfig], device_type: str, progress: Any
) -> list[dict[str, Any]] | None:
    """The per-rank body of training runs: train each config in turn, gathering to rank 0."""
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    ctx = DistContext(rank, world_size, rank, device, dist.get_backend())
    payloads, done = [], 0
    for cfg in configs:

        def on_step(step: int, before: int = done) -> None:
            if rank == 0:
                progress.value = before + step

        payloads.append(run_rank(cfg, ctx, on_step))
        done += cfg.stop_after or cfg.steps
    return payloads if rank == 0 else None


# ---------------------------------------------------------------------- in the parent
def _read(path: Path) -> str:
    """A log file's text, or "" if the worker never got as far as creating it."""
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


def _root_cause(procs: list[Any], outdir: Path) -> WorkerError:
    """Which rank failed first, and how: a death by signal, else the earliest traceback."""
    for rank, p in enumerate(procs):
        code = p.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            detail = f"process died with signal {name} (exit code {code}); no Python exception"
            return WorkerError(rank, detail, _tail(outdir / f"rank{rank}.log"))
    errors = []
    for rank in range(len(procs)):
        path = outdir / f"rank{rank}.error.json"
        if path.exists():
            errors.append((json.loads(path.read_text()), rank))
    if errors:
        record, rank = min(errors, key=lambda e: e[0]["time"])
        detail = f"{record['type']}: {record['message']}"
        return WorkerError(rank, detail, record["traceback"].strip())
    rank, code = next((r, p.exitcode) for r, p in enumerate(procs) if p.exitcode)
    return WorkerError(rank, f"exited with code {code}", _tail(outdir / f"rank{rank}.log"))


def _stop(procs: list[Any]) -> None:
    """Terminate, then kill, every child still alive, and reap them all."""
    procs = [p for p in procs if p.pid is not None]  # a failed start leaves nothing to stop
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(2.0)


def spawn_with_logs(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    deadline_s: float | None = None,
    threads: int | None = None,
    on_poll: Callable[[], None] | None = None,
) -> tuple[list[Any], dict[int, str]]:
    """``spawn``, also returning each rank's log (its stdout and stderr)."""
    per_rank_threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    outdir = Path(tempfile.mkdtemp(prefix="labkit-run-"))  # mode 0700: this user's only
    context = mp.get_context("spawn")
    procs = [
        context.Process(
            target=_entry,
            args=(
                r,
                world_size,
                fn,
                tuple(args),
                str(outdir / "store"),
                str(outdir),
                backend,
                timeout_s,
                per_rank_threads,
            ),
            daemon=True,
            name=f"labkit-rank{r}",
        )
        for r in range(world_size)
    ]
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        for p in procs:
            p.start()
        while True:
            if on_poll is not None:
                on_poll()
            codes = [p.exitcode for p in procs]
            if any(c not in (None, 0) for c in codes):
                # Give the peers a moment to record their own errors, then find the first cause.
                time.sleep(GRACE_S)
                raise _root_cause(procs, outdir)
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                logs = "".join(
                    f"\n--- rank {r} log ---\n{_tail(outdir / f'rank{r}.log')}"
                    for r in range(world_size)
                )
                raise TimeoutError(f"{fn.__name__} did not finish within {deadline_s} s{logs}")
            time.sleep(POLL_S)
        missing = [r for r in range(world_size) if not (outdir / f"rank{r}.pt").exists()]
        if missing:
            raise WorkerError(missing[0], "finished without writing its result")
        # Our own workers' results, from our private directory: arbitrary objects are expected.
        results = [
            torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
    finally:
        _stop(procs)
        logs = {r: _read(outdir / f"rank{r}.log") for r in range(world_size)}
        shutil.rmtree(outdir, ignore_errors=True)
    return results, logs


def spawn(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return their results.

    Each process joins a process group (``backend``) before calling ``fn``, so ``fn`` may use any
    collective. ``fn`` must be a module-level function (spawned processes import it by name; a
    function defined in a notebook cannot travel). Rendezvous is a TCPStore on a free port; the
    whole run is bounded by ``timeout_s``; a failing rank raises ``WorkerError`` naming it; every
    process is reaped before this returns or raises.
    """
    results, _ = spawn_with_logs(
        fn,
        world_size,
        args,
        backend=backend,
        timeout_s=timeout_s,
        deadline_s=timeout_s,
        threads=threads,
    )
    return results


def run_many(
    configs: Sequence[TrainConfig], *, progress: bool = True, desc: str | None = None
) -> list[RunResult]:
    """Train several multi-process configs one after another in the same worker processes.

    Each result is what ``labkit.run(cfg)`` returns for that config, but the process start-up
    (spawn, imports, rendezvous: seconds on a laptop) is paid once: notebooks that compare
    strategies use this. All configs must share ``world_size`` and device; every config is
    validated before a process starts.
    """
    configs = list(configs)
    if not configs:
        return []
    devices = {resolve_device(c) for c in configs}
    if len({c.world_size for c in configs}) > 1 or len(devices) > 1:
        raise ValueError("run_many: all configs must share world_size, device and backend")
    if any(c.strategy == "single" for c in configs):
        raise ValueError("run_many runs multi-process strategies; use labkit.run for 'single'")
    for cfg in configs:
        preflight(cfg)
    return _launch_many(configs, devices.pop(), progress=progress, desc=desc)


def _launch_many(
    configs: list[TrainConfig],
    device: tuple[str, str],
    *,
    progress: bool,
    desc: str | None = None,
) -> list[RunResult]:
    """``run_many`` after its checks: start the workers, show progress, gather the results."""
    from tqdm.auto import tqdm

    first = configs[0]
    device_type, backend = device
    counter = mp.get_context("spawn").Value("i", 0)  # rank 0 writes its step count here
    bar = tqdm(
        total=sum(c.stop_after or c.steps for c in configs),
        desc=desc or " + ".join(f"{c.strategy} x{c.world_size}" for c in configs),
        disable=not progress,
        leave=False,
    )

    def show_progress() -> None:
        bar.n = counter.value
        bar.refresh()

    try:
        results, logs = spawn_with_logs(
            _train_worker,
            first.world_size,
            (configs, device_type, counter),
            backend=backend,
            timeout_s=first.timeout_s,
            threads=threads_per_rank(first),
            on_poll=show_progress,
        )
    finally:
        bar.close()
    out = []
    for cfg, payload in zip(configs, results[0], strict=True):
        info = dict(payload["info"], backend=backend, world_size=cfg.world_size)
        out.append(RunResult.from_ranks(cfg, payload, info, logs))
    return out


def launch(cfg: TrainConfig) -> RunResult:
    """Run ``cfg`` on ``cfg.world_size`` spawned worker processes and gather a RunResult."""
    return _launch_many([cfg], resolve_device(cfg), progress=cfg.progress)[0]


def run_single(
    cfg: TrainConfig, on_step: Callable[[int, list[dict[str, Any]]], None] | None = None
) -> RunResult:
    """Train ``strategy="single"`` in this process, with a progress bar.

    ``on_step(step, metrics)`` is called after every optimizer step with the rows so far (a live
    plot uses it).
    """
    from tqdm.auto import tqdm

    device_type, _ = resolve_device(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bar = tqdm(
        total=cfg.stop_after or cfg.steps, desc="single", disable=not cfg.progress, leave=False
    )
    t_start = time.perf_counter()
    try:
        trainer = Trainer(cfg, DistContext(device=torch.device(device_type)))

        def step_done(step: int) -> None:
            bar.n = step
            bar.refresh()
            if on_step is not None:
                on_step(step, trainer.metrics)

        out = trainer.fit(step_done)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    info = dict(out.info, backend=None, world_size=1, wall_s=time.perf_counter() - t_start)
    payload = {
        "metrics": out.metrics,
        "timeline": out.timeline,
        "layer_norms": out.layer_norms,
        "state": out.state,
    }
    return RunResult.from_ranks(cfg, payload, info)


def run(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train with ``config`` (and/or keyword overrides) and return a RunResult.

    ``strategy="single"`` trains in this process; any other strategy starts ``world_size`` worker
    processes and gathers their results. Everything is validated before a process starts.
    """
    cfg = make_config(config, **overrides)
    resolve_device(cfg)  # raises on an impossible device request before anything starts
    preflight(cfg)
    t_start = time.perf_counter()
    result = run_single(cfg) if cfg.strategy == "single" else launch(cfg)
    result.info["wall_s"] = time.perf_counter() - t_start
    warn_if_nothing_trained(result)
    return result


def warn_if_nothing_trained(result: RunResult) -> None:
    """A run whose every step was skipped for non-finite gradients did not train: say so."""
    skipped, ran = result.info.get("skipped_steps", 0), result.metrics["step"].nunique()
    if ran and skipped >= ran:
        warnings.warn(
            f"every one of the {ran} steps was skipped for a non-finite gradient norm: the model "
            "did not train (lower lr, turn on clipping, or use nonfinite='raise' to stop at once)",
            stacklevel=3,
        )


def run_under_torchrun(cfg: TrainConfig) -> RunResult | None:
    """The per-rank entry when ``torchrun`` started this process (env:// rendezvous).

    Works on one node or many: ``torchrun --nnodes 2 --nproc-per-node 8 ... -m labkit train ...``.
    Returns the RunResult on global rank 0 and None elsewhere.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != cfg.world_size:
        cfg = cfg.replace(world_size=world)
    if rank == 0:  # one rank checks the shared paths; a failure here stops the whole job
        preflight(cfg)
    device_type, backend = resolve_device(cfg)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    ctx = DistContext(rank, world, local_rank, device, backend)
    t_start = time.perf_counter()
    try:
        payload = run_rank(cfg, ctx)
    finally:
        dist.destroy_process_group()
    if payload is None:
        return None
    info = dict(payload["info"], backend=backend, world_size=world)
    info["wall_s"] = time.perf_counter() - t_start
    return RunResult.from_ranks(cfg, payload, info)
