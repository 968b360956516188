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
    """A worker: join the process group, run the job's function, hand its result back in a file."""
    out = Path(job_dir)
    job = json.loads((out / "job.json").read_text())
    _die_with_parent(job["parent"])
    # Local ranks talk over loopback only: Gloo would otherwise bind to the host name's address.
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(job["threads"])
        fn, args = pickle.loads((out / "job.pkl").read_bytes())
        timeout = timedelta(seconds=job["timeout_s"])
        store = dist.FileStore(str(out / "store"), job["world_size"])
        store.set_timeout(timeout)
        if job["backend"] == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            job["backend"], store=store, rank=rank, world_size=job["world_size"], timeout=timeout
        )
        result = fn(rank, job["world_size"], *args)
        tmp = out / f".rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, out / f"rank{rank}.pt")
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
    outdir = Path(tempfile.mkdtemp(prefix="labkit-run-"))  # mode 0700: this user's only
    job = {
        "parent": os.getpid(),
        "world_size": world_size,
        "backend": backend,
        "timeout_s": timeout_s,
        "threads": threads or max(1, (os.cpu_count() or 1) // world_size),
    }
    procs: list[subprocess.Popen] = []
    try:
        (outdir / "job.pkl").write_bytes(pickle.dumps((fn, tuple(args))))
        (outdir / "job.json").write_text(json.dumps(job))
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        procs = [_start(r, outdir) for r in range(world_size)]
        while True:
            if on_poll is not None:
                on_poll()
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                # Give the peers a moment to record their own errors, then find the first cause.
                time.sleep(GRACE_S)
                for p in procs:
                    p.poll()
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
        import torch

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
