"""Run a learner's function on real Gloo processes: shared by the distributed exercises.

Workers are fresh interpreters (``labkit.supervisor``): a function reaches them by name when it
lives in an importable module, and by its *source* otherwise (a notebook cell, ``__main__``, a
function defined inside another one). ``ship`` packs either; ``load`` rebuilds it in a worker,
in a namespace holding the exercise module's names (``torch``, ``dist``, helpers), the modules
the learner's cell imported, importable objects it uses, its simple constants and the source of
other functions of the notebook it calls. A string of source is accepted too: its last
top-level ``def`` is the function.

``run`` starts the check through ``labkit.supervisor.run_on_workers`` (warm workers in a
notebook, so the second check starts in well under a second) and turns a rank's exception or
a hang into the learner's message.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from labkit.supervisor import WorkerError, run_on_workers

LEARNER_FILE = "<your code>"


class LearnerError(RuntimeError):
    """The learner's function raised; the message says in which case (it ends the run)."""


@dataclass(frozen=True)
class Shipped:
    """A learner's function, ready to travel to a worker (by reference, or by source)."""

    name: str
    fn: Callable[..., Any] | None = None
    sources: tuple[str, ...] = ()
    modules: dict[str, str] = field(default_factory=dict)
    objects: dict[str, tuple[str, str]] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)


def _importable(fn: Any) -> bool:
    """Whether a worker can import ``fn`` by name (not so for a module loaded from a file path)."""
    module = getattr(fn, "__module__", None)
    if module in (None, "__main__") or "<locals>" in getattr(fn, "__qualname__", "<"):
        return False
    top = module.split(".")[0]
    return top in sys.builtin_module_names or PathFinder.find_spec(top, sys.path) is not None


def _names(code: types.CodeType) -> set[str]:
    """Global names a function (and the functions nested in it) may read."""
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _names(const)
    return found


def ship(fn: Callable[..., Any] | str) -> Shipped:
    """Pack ``fn`` (a function, or a string of source code) for ``load`` in a worker."""
    if isinstance(fn, str):
        defs = [n.name for n in ast.parse(fn).body if isinstance(n, ast.FunctionDef)]
        if not defs:
            raise ValueError("the source you passed defines no function (no top-level def)")
        return Shipped(name=defs[-1], sources=(textwrap.dedent(fn),))
    if not callable(fn):
        raise TypeError(f"expected a function, got {type(fn).__name__}")
    if getattr(fn, "__name__", "") == "<lambda>":
        raise ValueError("a lambda cannot travel to the workers: define the function with def")
    if _importable(fn):
        return Shipped(name=fn.__name__, fn=fn)
    fn = inspect.unwrap(fn)  # a decorated function: its source has the decorator line
    if fn.__code__.co_freevars:
        raise ValueError(
            f"{fn.__name__} uses variables of the function it is defined in "
            f"({', '.join(fn.__code__.co_freevars)}): define it at the top level of a cell"
        )
    sources: list[str] = []
    modules: dict[str, str] = {}
    objects: dict[str, tuple[str, str]] = {}
    constants: dict[str, Any] = {}
    todo, seen = [fn], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        f = inspect.unwrap(f)
        source = textwrap.dedent(inspect.getsource(f))
        sources.insert(0, source)
        in_decorators = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        for name in _names(f.__code__) | in_decorators:
            value = f.__globals__.get(name)
            if isinstance(value, types.ModuleType):
                modules[name] = value.__name__
            elif isinstance(value, types.FunctionType) and not _importable(value):
                todo.append(value)
            elif _importable(value) and hasattr(value, "__qualname__"):
                objects[name] = (value.__module__, value.__qualname__)
            elif isinstance(value, int | float | str | bool | tuple):
                constants[name] = value
    return Shipped(fn.__name__, None, tuple(sources), modules, objects, constants)


def load(shipped: Shipped, namespace: dict[str, Any]) -> Callable[..., Any]:
    """Rebuild a shipped function in a worker; ``namespace`` seeds its globals."""
    if shipped.fn is not None:
        return shipped.fn
    ns = dict(namespace)
    ns.update({k: importlib.import_module(m) for k, m in shipped.modules.items()})
    for key, (module, qualname) in shipped.objects.items():
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        ns[key] = obj
    ns.update(shipped.constants)
    for source in shipped.sources:
        exec(compile(source, LEARNER_FILE, "exec"), ns)  # noqa: S102 (the learner's own code)
    return ns[shipped.name]


def call(fn: Callable[..., Any], where: str, *args: Any) -> Any:
    """``fn(*args)``; an exception becomes a ``LearnerError`` naming ``where`` (ends the run)."""
    try:
        return fn(*args)
    except Exception as err:
        raise LearnerError(f"{where}: {type(err).__name__}: {err}") from err


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any: the ranks stop (or go on) together.

    A rank that stopped alone would leave its peers waiting in their next collective. Uses
    c10d's own all-reduce, so ``watching`` never sees it.
    """
    t = torch.tensor([int(flag)])
    distributed_c10d.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextmanager
def watching(names: tuple[str, ...], on_call: Callable[..., Any]) -> Iterator[None]:
    """Route ``torch.distributed.<name>`` calls through ``on_call(name, original, *a, **kw)``."""
    originals = {name: getattr(dist, name) for name in names}

    def wrapper(name: str) -> Callable[..., Any]:
        def patched(*args: Any, **kwargs: Any) -> Any:
            return on_call(name, originals[name], *args, **kwargs)

        return patched

    try:
        for name in names:
            setattr(dist, name, wrapper(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def run(
    worker: Callable[..., Any], args: tuple[Any, ...], world_size: int = 2, timeout_s: float = 60.0
) -> list[Any] | str:
    """Run ``worker(rank, world_size, *args)`` on Gloo processes: each rank's result, or a message."""
    deadline = time.monotonic() + timeout_s + 10.0

    def guard() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the check did not finish within {timeout_s:.0f} s")

    try:
        results, _ = run_on_workers(
            worker, world_size, args, timeout_s=timeout_s, threads=1, on_poll=guard
        )
        return results
    except WorkerError as err:
        if err.detail.startswith("LearnerError: "):
            return f"Not yet: on rank {err.rank}, {err.detail.removeprefix('LearnerError: ')}"
        if "timed out" in err.detail.lower() or "timeout" in err.detail.lower():
            return _hang_message(timeout_s)
        return f"Not yet: rank {err.rank} failed: {err.detail}"
    except TimeoutError:
        return _hang_message(timeout_s)


def _hang_message(timeout_s: float) -> str:
    return (
        f"Not yet: the ranks were still waiting after {timeout_s:.0f} s: a deadlock. Some rank "
        "waits for a message (or a collective) that its peer never sends: every rank must make "
        "the same collective calls in the same order, and a send needs its matching receive "
        "posted (isend and irecv both, then wait)."
    )


def ship_all(fns: tuple[Any, ...]) -> tuple[Shipped, ...] | str:
    """Every learner function shipped, or the message saying why one could not be."""
    try:
        return tuple(ship(fn) for fn in fns)
    except (OSError, TypeError, ValueError) as err:
        what = "function" if len(fns) == 1 else "functions"
        return f"Not yet: could not send your {what} to the workers: {err}"


def verdict(
    worker: Callable[..., Any], fns: tuple[Any, ...], correct: str, timeout_s: float = 60.0
) -> str:
    """Ship ``fns``, run ``worker`` on 2 Gloo processes: the first complaint, or ``correct``."""
    shipped = ship_all(fns)
    if isinstance(shipped, str):
        return shipped
    return first_message(run(worker, shipped, 2, timeout_s)) or correct


def first_message(results: list[Any] | str) -> str | None:
    """A message from ``run`` or the first rank's complaint (None: every rank was happy)."""
    if isinstance(results, str):
        return results
    return next((r for r in results if r), None)
