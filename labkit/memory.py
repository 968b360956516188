"""Measuring a rank's memory: activations saved for backward, gradients, optimizer state.

``SavedTensorMeter`` counts what autograd keeps for backward, through
``torch.autograd.graph.saved_tensors_hooks``: every tensor an operation saves passes through its
pack hook, and is released when autograd drops it (after its backward, or when the graph is
freed). It counts distinct storages (views of one tensor count once) and leaves parameters out
(they are counted as parameters). Its ``peak`` is the activation memory of a step: what 1F1B,
recomputation and micro-batching change.

``state_bytes`` counts the distinct storages of gradients and of the optimizer's state tensors
at the moment it is called (the trainer calls it right before the optimizer step, when both
exist).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "state_bytes", "storage_bytes", "storage_ids"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local piece)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def storage_ids(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Identities of the storages behind ``tensors`` (stable while a storage is resized)."""
    return {_local(t).untyped_storage()._cdata for t in tensors}


def state_bytes(params: Iterable[torch.Tensor], optimizer: Any) -> dict[str, int]:
    """``grads_bytes`` and ``optimizer_bytes`` this rank holds now."""
    inner = getattr(optimizer, "optim", optimizer)  # a ShardedOptimizer keeps its state inside
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    grads = [p.grad for p in params if p.grad is not None]
    return {"grads_bytes": storage_bytes(grads), "optimizer_bytes": storage_bytes(state)}


class _Saved:
    """What autograd holds instead of a saved tensor; releasing it releases the count."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """A context manager: bytes of tensors saved for backward, alive now (``live``) and at most
    (``peak``), while it is active.

    Parameters are not counted, nor views of them (``F.linear`` saves ``weight.t()``): any
    tensor whose storage is one of ``exclude()``'s (storage identities, ``_cdata``) is skipped.
    """

    def __init__(self, exclude: Callable[[], set[int]] | None = None) -> None:
        self.live = 0
        self.peak = 0
        self._exclude = exclude or set
        self._skip: set[int] = set()
        self._storages: dict[int, list[int]] = {}  # storage identity -> [references, nbytes]
        self._hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or tensor.device.type == "meta":
            return tensor
        storage = _local(tensor).untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key in self._skip:
            return tensor
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        saved = _Saved(tensor)
        weakref.finalize(saved, self._release, key)
        return saved

    def keep(self, tensor: torch.Tensor) -> Any:
        """Count ``tensor`` as an activation until the returned handle is dropped (a tensor kept
        for a later pass outside autograd, such as zero-bubble's stash); ``unwrap(handle)`` is
        the tensor. Outside the meter's context nothing is counted."""
        return self._pack(tensor) if self._hooks is not None else tensor

    @staticmethod
    def unwrap(handle: Any) -> torch.Tensor:
        """The tensor behind a ``keep`` handle."""
        return SavedTensorMeter._unpack(handle)

    def skip(self, ids: set[int]) -> None:
        """Leave these storages out from now on (parameters gathered while the meter runs)."""
        self._skip |= ids

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __enter__(self) -> SavedTensorMeter:
        self._skip = self._exclude()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
