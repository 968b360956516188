"""The process supervisor: start worker processes, watch them, stop them, hand back their results.

It knows nothing of training: it runs any module-level function ``fn(rank, world_size, *args)``
on N fresh processes that share a ``torch.distributed`` process group. ``labkit.launch`` builds
training runs on it; the lessons' collective demos use it directly.

How a worker starts. Each is a clean interpreter, ``python -m labkit._worker JOB_DIR RANK``,
the way torchrun starts its workers, not a ``multiprocessing`` spawn of the caller's ``__main__``:
so ``labkit.run`` works from a plain script with no ``if __name__ == "__main__":`` guard, from
``python -``, ``python -c``, IPython, a notebook and pytest alike. The job (function, arguments)
travels as a pickle in a private directory (mode 0700), the caller's ``sys.path`` as the worker's
``PYTHONPATH``, so whatever the caller could import, the worker can too. A worker's stdout and
stderr go to its log file from the first instruction, so even a worker that dies before it
reaches labkit's code leaves its reason on the screen.

Rendezvous goes through a ``FileStore`` in that directory, not a TCP port: nothing of a local run
listens on the network, two runs at once can never collide, and no other user can join one.
Gloo's connections between the ranks are pinned to the loopback interface.

Watching. If a worker raises, it writes its traceback to a file and exits; if one is killed, its
exit code says by which signal. Either way the supervisor stops the other ranks (they would
otherwise wait forever in a collective), reaps every process and raises ``WorkerError`` naming
the rank and its cause, within about a second. Workers ask the kernel to kill them if the parent
dies (``PR_SET_PDEATHSIG``), so no orphan outlives a crashed kernel.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"  # the loopback interface's name
POLL_S = 0.05  # how often the parent looks at its children
GRACE_S = 1.0  # after a failure, how long peers get to report their own errors before being killed
_LIVE: set[subprocess.Popen] = set()  # every worker this process started and has not reaped


class WorkerError(RuntimeError):
    """A worker rank failed; ``rank`` is the rank, ``detail`` its exception or exit signal."""

    def __init__(self, rank: int, detail: str, log_tail: str = "") -> None:
        self.rank, self.detail, self.log_tail = rank, detail, log_tail
        message = f"rank {rank} failed: {detail}"
        if log_tail:
            message += f"\n--- last lines of rank {rank}'s log ---\n{log_tail}"
        super().__init__(message)


class Counter:
    """An integer shared between the parent and its workers (progress: steps done by rank 0).

    A small file, so it travels to a fresh interpreter by its path; ``value`` reads or writes it
    (the write is atomic, the reader never sees half a number).
    """

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="labkit-progress-")
        os.write(fd, b"0")
        os.close(fd)
        weakref.finalize(self, _unlink, self.path)  # in the creating process only

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]

    @property
    def value(self) -> int:
        """The last value written (0 if none could be read)."""
        try:
            return int(Path(self.path).read_text() or 0)
        except (OSError, ValueError):
            return 0

    @value.setter
    def value(self, number: int) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        Path(tmp).write_text(str(int(number)))
        os.replace(tmp, self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------- inside a worker
def _die_with_parent(parent: int) -> None:
    # Linux: the kernel sends SIGKILL to this process when its parent exits, however it exits.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the parent died before we could ask
        os._exit(1)


def _worker_main(job_dir: str, rank: int) -> None:
    """A worker: join the process group, then run job after job, each result handed back in a file.

    Jobs are files ``job-1.pkl``, ``job-2.pkl``, ... written by the parent; a one-shot run has one
    and the worker exits after it, a warm pool's workers wait for the next.
    """
    out = Path(job_dir)
    job = json.loads((out / "job.json").read_text())
    _die_with_parent(job["parent"])
    # Local ranks talk over loopback only: Gloo would otherwise bind to the host name's address.
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    try:
        import random

        import torch
        import torch.distributed as dist

        timeout = timedelta(seconds=job["timeout_s"])
        store = dist.FileStore(str(out / "store"), job["world_size"])
        store.set_timeout(timeout)
        if job["backend"] == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            job["backend"], store=store, rank=rank, world_size=job["world_size"], timeout=timeout
        )
        n = 0
        while job["jobs"] is None or n < job["jobs"]:
            n += 1
            path = out / f"job-{n}.pkl"
            while not path.exists():  # a warm pool's idle wait
                if os.getppid() != job["parent"]:
                    os._exit(1)
                time.sleep(0.01)
            fn, args = pickle.loads(path.read_bytes())
            # Every job starts from the same process state, pooled or fresh.
            torch.set_num_threads(job["threads"])
            torch.manual_seed(0)
            random.seed(0)
            result = fn(rank, job["world_size"], *args)
            tmp = out / f".rank{rank}.{n}.pt.tmp"
            torch.save(result, tmp)
            os.replace(tmp, out / f"rank{rank}.{n}.pt")
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 (every failure must reach the parent)
        record = {
            "type": type(err).__name__,
            "message": str(err),
            "traceback": traceback.format_exc(),
            "time": time.time(),
        }
        (out / f"rank{rank}.error.json").write_text(json.dumps(record))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip atexit/NCCL teardown that could hang on a broken group
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: c10d's background threads occasionally abort in it
    # ("terminate called without an active exception", ~1 run in 20), after all work is done.
    os._exit(0)


# ---------------------------------------------------------------------- in the parent
def _read(path: Path) -> str:
    """A log file's text, or "" if the worker never got as far as creating it."""
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


def _root_cause(procs: list[subprocess.Popen], outdir: Path) -> WorkerError:
    """Which rank failed first, and how: a death by signal, else the earliest traceback."""
    for rank, p in enumerate(procs):
        code = p.returncode
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
    rank, code = next((r, p.returncode) for r, p in enumerate(procs) if p.returncode)
    detail = f"exited with code {code} before reaching labkit's code"
    return WorkerError(rank, detail, _tail(outdir / f"rank{rank}.log", 30))


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate, then kill, every child still alive, and reap them all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 3.0
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(2.0)
        _LIVE.discard(p)


@atexit.register
def _stop_all() -> None:
    # Where the kernel cannot kill orphans for us (not Linux), the interpreter's exit does.
    _stop(list(_LIVE))


def _importable(fn: Callable[..., Any]) -> None:
    if getattr(fn, "__module__", None) == "__main__" or "<locals>" in fn.__qualname__:
        raise ValueError(
            f"spawn: {fn.__qualname__} must be a module-level function of an importable module "
            "(workers are fresh interpreters and import it by name; a function defined in a "
            "notebook, a script's __main__ or another function cannot travel)"
        )


def _start(rank: int, outdir: Path) -> subprocess.Popen:
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]  # "" means the caller's working directory
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    log = open(outdir / f"rank{rank}.log", "wb")  # noqa: SIM115 (the child owns it; closed below)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "labkit._worker", str(outdir), str(rank)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
        )
    finally:
        log.close()
    _LIVE.add(proc)
    return proc


class _Workers:
    """``world_size`` worker processes in one process group, ready to run jobs.

    ``jobs=1``: a one-shot run (the workers exit after it); ``jobs=None``: a warm pool.
    """

    def __init__(
        self, world_size: int, backend: str, timeout_s: float, threads: int, jobs: int | None
    ) -> None:
        self.key = (world_size, backend, timeout_s, threads)
        self.world_size, self.n = world_size, 0
        self.outdir = Path(tempfile.mkdtemp(prefix="labkit-run-"))  # mode 0700: this user's only
        job = {
            "parent": os.getpid(),
            "world_size": world_size,
            "backend": backend,
            "timeout_s": timeout_s,
            "threads": threads,
            "jobs": jobs,
        }
        (self.outdir / "job.json").write_text(json.dumps(job))
        self.procs: list[subprocess.Popen] = []
        try:
            self.procs = [_start(r, self.outdir) for r in range(world_size)]
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, by rank."""
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        """True while every worker is running (a warm pool waiting for its next job)."""
        return all(p.poll() is None for p in self.procs)

    def _log(self, rank: int) -> Path:
        return self.outdir / f"rank{rank}.log"

    def run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        *,
        deadline_s: float | None = None,
        on_poll: Callable[[], None] | None = None,
    ) -> tuple[list[Any], dict[int, str]]:
        """Run ``fn(rank, world_size, *args)`` on every worker; their results and new log lines."""
        self.n += 1
        n, ranks = self.n, range(self.world_size)
        offsets = {r: len(_read(self._log(r))) for r in ranks}
        tmp = self.outdir / f".job-{n}.pkl"
        tmp.write_bytes(pickle.dumps((fn, tuple(args))))
        os.replace(tmp, self.outdir / f"job-{n}.pkl")  # workers never see half a job
        results_at = [self.outdir / f"rank{r}.{n}.pt" for r in ranks]
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        while not all(path.exists() for path in results_at):
            if on_poll is not None:
                on_poll()
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes):
                # Give the peers a moment to record their own errors, then find the first cause.
                time.sleep(GRACE_S)
                for p in self.procs:
                    p.poll()
                raise _root_cause(self.procs, self.outdir)
            if all(c == 0 for c in codes) and not all(p.exists() for p in results_at):
                missing = next(r for r in ranks if not results_at[r].exists())
                raise WorkerError(missing, "finished without writing its result")
            if deadline is not None and time.monotonic() > deadline:
                logs = "".join(f"\n--- rank {r} log ---\n{_tail(self._log(r))}" for r in ranks)
                raise TimeoutError(f"{fn.__name__} did not finish within {deadline_s} s{logs}")
            time.sleep(POLL_S)
        if on_poll is not None:
            on_poll()
        import torch

        # Our own workers' results, from our private directory: arbitrary objects are expected.
        results = [torch.load(path, weights_only=False) for path in results_at]
        for path in results_at:
            path.unlink()
        return results, {r: _read(self._log(r))[offsets[r] :] for r in ranks}

    def close(self) -> None:
        """Stop every worker and remove the run's directory."""
        _stop(self.procs)
        shutil.rmtree(self.outdir, ignore_errors=True)


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
    _importable(fn)
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    workers = _Workers(world_size, backend, timeout_s, threads, jobs=1)
    try:
        return workers.run(fn, args, deadline_s=deadline_s, on_poll=on_poll)
    finally:
        workers.close()


# ---------------------------------------------------------------------- the warm pool
# Interactive use (a notebook, IPython) pays the worker start-up (seconds) once: later runs with
# the same world size, backend and threads reuse the processes and their process group. Each job
# starts from the same process state (seeds, threads) and builds its model, optimizer and data
# afresh, so a pooled run equals a fresh one bit for bit. A run that fails or is interrupted tears
# the pool down; the next run builds a new one. The pool dies with its parent (PR_SET_PDEATHSIG,
# atexit), so it never outlives the kernel.
_POOL: _Workers | None = None
_POOL_LOCK = threading.Lock()
_KEEP: bool | None = None  # None: keep workers warm inside IPython/Jupyter only


def _interactive() -> bool:
    shell = sys.modules.get("IPython")
    return shell is not None and shell.get_ipython() is not None


def keep_workers(enabled: bool | None = True) -> None:
    """Keep worker processes warm between training runs (True), never (False: also closes the
    pool), or decide by the environment (None: yes in IPython and Jupyter, no in scripts)."""
    global _KEEP
    _KEEP = enabled
    if enabled is False:
        close_pool()


def close_pool() -> None:
    """Stop the warm workers, if any (the next run starts new ones)."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


def pool_pids() -> list[int]:
    """Process ids of the warm workers, by rank ([] when there is no pool)."""
    return _POOL.pids if _POOL is not None else []


def run_on_workers(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int | None = None,
    on_poll: Callable[[], None] | None = None,
) -> tuple[list[Any], dict[int, str]]:
    """``spawn_with_logs`` through the warm pool where workers are kept (see ``keep_workers``).

    A second run while the pool is busy (another thread) gets fresh workers of its own.
    """
    global _POOL
    keep = _interactive() if _KEEP is None else _KEEP
    if not keep or not _POOL_LOCK.acquire(blocking=False):
        return spawn_with_logs(
            fn,
            world_size,
            args,
            backend=backend,
            timeout_s=timeout_s,
            threads=threads,
            on_poll=on_poll,
        )
    try:
        _importable(fn)
        threads = threads or max(1, (os.cpu_count() or 1) // world_size)
        key = (world_size, backend, timeout_s, threads)
        if _POOL is not None and (_POOL.key != key or not _POOL.alive()):
            close_pool()
        if _POOL is None:
            _POOL = _Workers(world_size, backend, timeout_s, threads, jobs=None)
        try:
            return _POOL.run(fn, args, on_poll=on_poll)
        except BaseException:
            close_pool()  # a failed or interrupted run leaves workers in an unknown state
            raise
    finally:
        _POOL_LOCK.release()


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
    collective. ``fn`` must be a module-level function of an importable module (workers import
    it by name). The whole run is bounded by ``timeout_s``; a failing rank raises
    ``WorkerError`` naming it; every process is reaped before this returns or raises.
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
