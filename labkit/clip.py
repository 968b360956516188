"""Gradient clipping: by global norm, by value, unit-wise (AGC), and two adaptive clippers.

Read this file top to bottom:

1. ``clip_grad_norm_``: the workhorse. It computes the *global* norm of all gradients, as if
   they were one long vector, and scales every gradient by the same factor
   ``min(max_norm / (norm + 1e-6), 1)``, so the direction of the update is kept. It is
   bit-for-bit the same as ``torch.nn.utils.clip_grad_norm_``, plus one thing torch's does not
   do: with ``group=`` it combines the norms of gradient *pieces* held by different ranks
   (ZeRO/FSDP shards, tensor-parallel slices, pipeline stages), so that every rank clips by
   the same global norm.
2. ``clip_grad_value_``: clamps every gradient element to ``[-v, v]`` (changes the direction).
3. ``adaptive_clip_grad_``: AGC, Brock et al. 2021, "High-Performance Large-Scale Image
   Recognition Without Normalization": each output unit's gradient is limited relative to the
   size of that unit's weights.
4. ``AutoClip``: Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source
   Separation Networks": clip to a percentile of the norms seen so far.
5. ``ZClip``: Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training":
   clip norms whose z-score against an exponential moving average is too high.
6. Helpers for the notebook (per-layer norms, cosine between gradients) and ``make_clipper``,
   the one entry point the training loop uses.
"""

from __future__ import annotations

import math
import numbers
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

# torch's own rule for "may this list use the fused foreach kernels?" (device type and plain
# Tensor subclasses). We reuse it so that foreach=None falls back exactly when torch's does.
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "CLIP_METHODS",
    "AutoClip",
    "GradPieces",
    "Clipper",
    "ZClip",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "global_grad_norm",
    "grad_cosine",
    "make_clipper",
    "per_layer_grad_norms",
    "snapshot_grads",
]

CLIP_METHODS = ("none", "norm", "value", "agc", "autoclip", "zclip")

Params = Tensor | Iterable[Tensor]

# ---------------------------------------------------------------------------------------------
# Small building blocks shared by every clipper
# ---------------------------------------------------------------------------------------------


class GradPieces(list):
    """A list of tensors to clip, some of which do not *count* toward the norm on this rank.

    For gradients replicated over some ranks of the norm's group (a tensor-parallel run's layer
    norms and embeddings): every rank clips its copy, but only one rank counts it, so the
    combined norm includes it once. ``counted[i]`` is False for the tensors this rank leaves
    out of the norm. Any clipper of this module accepts it where it accepts a parameter list.
    """

    def __init__(self, tensors: Iterable[Tensor], counted: Sequence[bool]) -> None:
        super().__init__(tensors)
        if len(counted) != len(self):
            raise ValueError(f"GradPieces: {len(self)} tensors but {len(counted)} counted flags")
        self.uncounted = {id(t) for t, c in zip(self, counted, strict=True) if not c}


def _as_param_list(parameters: Params) -> list[Tensor]:
    """Accept one tensor or any iterable (a generator is consumed exactly once)."""
    if isinstance(parameters, Tensor):
        return [parameters]
    if isinstance(parameters, GradPieces):
        return parameters
    is_generator = isinstance(parameters, types.GeneratorType)
    params = list(parameters)
    if is_generator and not params:
        # Same warning as torch: an exhausted `model.parameters()` is a classic silent bug.
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
        )
    return params


class _Grads:
    """The gradients of a parameter list, grouped by (device, dtype) once and reused.

    The fused ``torch._foreach_*`` kernels need lists that share a device and dtype. Grouping
    once and keeping the groups for both the norm and the scaling is what keeps the hot path
    as lean as torch's (which groups twice).
    """

    __slots__ = ("flat", "groups", "norm_flat", "norm_groups")

    def __init__(self, parameters: Params, foreach: bool | None) -> None:
        params = _as_param_list(parameters)
        self.flat: list[Tensor] = [p.grad for p in params if p.grad is not None]
        self.groups = self._group(self.flat, foreach)
        # What the norm counts: everything, unless some pieces are counted on another rank.
        uncounted = getattr(params, "uncounted", None)
        if uncounted:
            self.norm_flat = [
                p.grad for p in params if p.grad is not None and id(p) not in uncounted
            ]
            self.norm_groups = self._group(self.norm_flat, foreach)
        else:
            self.norm_flat, self.norm_groups = self.flat, self.groups

    @staticmethod
    def _group(
        flat: list[Tensor], foreach: bool | None
    ) -> list[tuple[torch.device, list[Tensor], bool]]:
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in flat:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        # Each entry: (device, tensors, use_foreach). Insertion order = first appearance, which
        # is also torch's order, so the stacked norms (and hence the rounding) are identical.
        return [
            (device, tensors, _use_foreach(tensors, device, foreach))
            for (device, _), tensors in by_key.items()
        ]


def _use_foreach(tensors: list[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Decide foreach on/off for one group, with torch's rules and error message."""
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def _as_group_list(group: Any) -> list[ProcessGroup]:
    """Normalise ``group=``: None, one ProcessGroup, or a list/tuple of them.

    ``None`` means "nothing to combine": this is also what ``torch.distributed.group.WORLD``
    evaluates to when no process group was initialised, so the same code runs single-process.
    """
    if group is None:
        return []
    if isinstance(group, (list, tuple)):
        return [g for g in group if g is not None]
    return [group]


def _collective_device(group: ProcessGroup) -> torch.device:
    """Pick the device for the scalar all_reduce, the same on every rank.

    It must not depend on the local gradients: a rank with an empty shard has none, and all
    ranks must call the collective with tensors on the same kind of device. NCCL only
    reduces CUDA tensors; Gloo (and everything else we use) reduces CPU tensors.
    """
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Who wants to know when the global norm's all-reduce ran (the trainer's timeline): callbacks
# taking (start, end) perf_counter seconds. Empty outside ``norm_collectives``.
_NORM_LISTENERS: list[Callable[[float, float], None]] = []


@contextmanager
def norm_collectives(callback: Callable[[float, float], None]) -> Iterator[None]:
    """Within the block, call ``callback(start, end)`` (``time.perf_counter`` seconds) around
    each all-reduce that combines gradient norms across ranks: the wait a clipping step spends
    on the other ranks, which a timeline should draw as waiting, not work."""
    _NORM_LISTENERS.append(callback)
    try:
        yield
    finally:
        _NORM_LISTENERS.remove(callback)


def _combine_across_ranks(
    local: Tensor | None, norm_type: float, groups: list[ProcessGroup]
) -> Tensor:
    """Turn each rank's norm of its own piece into the norm of the whole, on every rank.

    For a finite p the p-norm of a concatenation is ``(sum_i ||piece_i||_p ** p) ** (1/p)``,
    so we all_reduce SUM the p-th powers; for p = inf the norm is the largest element, so we
    all_reduce MAX. The scalar travels in float64 so that fp16 p-th powers cannot overflow and
    every rank sends the same dtype, even a rank that holds no gradient at all.
    """
    if norm_type == math.inf:
        op, contribution = dist.ReduceOp.MAX, (local if local is not None else 0.0)
    elif norm_type == -math.inf:
        op, contribution = dist.ReduceOp.MIN, (local if local is not None else math.inf)
    elif norm_type == 0:
        # The "0-norm" counts non-zeros: counts simply add up.
        op, contribution = dist.ReduceOp.SUM, (local if local is not None else 0.0)
    else:
        # An empty piece adds nothing to the sum of |x|**p.
        op = dist.ReduceOp.SUM
        contribution = local.double() ** norm_type if local is not None else 0.0

    value = torch.as_tensor(contribution, dtype=torch.float64)
    start = time.perf_counter()
    for g in groups:
        value = value.to(_collective_device(g))
        dist.all_reduce(value, op=op, group=g)
    if groups:
        end = time.perf_counter()
        for listener in _NORM_LISTENERS:
            listener(start, end)
    if math.isfinite(norm_type) and norm_type != 0:
        value = value ** (1.0 / norm_type)
    if local is None:
        return value.to(torch.get_default_dtype())
    return value.to(device=local.device, dtype=local.dtype)


def _total_norm(grads: _Grads, norm_type: float, group: Any) -> Tensor:
    """Norm of all gradients as one vector: one foreach norm per group, stack, one norm."""
    norm_type = float(norm_type)
    groups = _as_group_list(group)
    norms: list[Tensor] = []
    for _, tensors, use_foreach in grads.norm_groups:
        if use_foreach:
            norms.extend(torch._foreach_norm(tensors, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(g, norm_type) for g in tensors)

    local: Tensor | None = None
    if norms:
        if len(grads.norm_groups) > 1:  # several devices or dtypes: gather on the first one
            first_device = grads.norm_flat[0].device
            norms = [n.to(first_device) for n in norms]
        local = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if groups:
        return _combine_across_ranks(local, norm_type, groups)
    return local if local is not None else torch.tensor(0.0)


def _scale_to_max_norm_(grads: _Grads, max_norm: float, total_norm: Tensor) -> None:
    """Multiply every gradient by ``min(max_norm / (total_norm + 1e-6), 1)``, in place.

    We multiply even when the factor is 1: deciding "is it 1?" would need the value on the
    CPU, which on a GPU stalls the pipeline (and x * 1.0 == x exactly anyway).
    """
    if not grads.flat:
        return
    clip_coef = float(max_norm) / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for device, tensors, use_foreach in grads.groups:
        coef = clip_coef_clamped.to(device)
        if use_foreach:
            torch._foreach_mul_(tensors, coef)
        else:
            for g in tensors:
                g.mul_(coef)


def _raise_if_nonfinite(total_norm: Tensor, norm_type: float) -> None:
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


# ---------------------------------------------------------------------------------------------
# 1. Clip by global norm (and just measure it)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def global_grad_norm(
    parameters: Params,
    norm_type: float = 2.0,
    *,
    group: ProcessGroup | Sequence[ProcessGroup] | None = None,
    foreach: bool | None = None,
) -> Tensor:
    """Return the norm of all gradients seen as one vector (over ``group``), without clipping."""
    return _total_norm(_Grads(parameters, foreach), norm_type, group)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Params,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    group: ProcessGroup | Sequence[ProcessGroup] | None = None,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Scale gradients in place so that their global ``norm_type``-norm is at most ``max_norm``.

    Args:
        parameters: a tensor or an iterable of tensors; those whose ``.grad`` is None are skipped.
        max_norm: the largest allowed global norm.
        norm_type: p of the p-norm (``float("inf")`` for the largest absolute value).
        group: None when every rank holds the *whole* gradient (single process, or data parallel
            after the gradient all-reduce). Otherwise the ProcessGroup (or a list of groups,
            e.g. ``[tp_group, pp_group]``) whose ranks hold *disjoint pieces* of the gradients;
            every rank of it must call this function, even one that holds no gradient.
        error_if_nonfinite: raise RuntimeError if the global norm is nan or inf.
        foreach: use the fused ``torch._foreach_*`` kernels (None: wherever torch would).

    Returns:
        The global norm *before* clipping, a 0-d tensor (the same on every rank of ``group``).

    Raises:
        ValueError: ``max_norm`` is not a number > 0 (torch would silently zero every gradient
            for 0 and flip them for a negative threshold).
    """
    _require("max_norm", max_norm, _is_number(max_norm) and max_norm > 0, "a number > 0")
    grads = _Grads(parameters, foreach)
    total_norm = _total_norm(grads, norm_type, group)
    if error_if_nonfinite:
        _raise_if_nonfinite(total_norm, norm_type)
    _scale_to_max_norm_(grads, max_norm, total_norm)
    return total_norm


# ---------------------------------------------------------------------------------------------
# 2. Clip by value
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_value_(parameters: Params, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place (as torch does).

    Raises ValueError unless ``clip_value`` is a number > 0.
    """
    _require("clip_value", clip_value, _is_number(clip_value) and clip_value > 0, "a number > 0")
    clip_value = float(clip_value)
    for _, tensors, use_foreach in _Grads(parameters, foreach).groups:
        if use_foreach:
            torch._foreach_clamp_min_(tensors, -clip_value)
            torch._foreach_clamp_max_(tensors, clip_value)
        else:
            for g in tensors:
                g.clamp_(min=-clip_value, max=clip_value)


# ---------------------------------------------------------------------------------------------
# 3. Adaptive gradient clipping (AGC), unit-wise
# ---------------------------------------------------------------------------------------------


def _unitwise_norm(x: Tensor) -> Tensor:
    """2-norm per output unit: over all dims but the first (torch stores weights out-first).

    Biases, gains and scalars (ndim <= 1) are treated as a single unit.
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Params,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    group: ProcessGroup | Sequence[ProcessGroup] | None = None,
) -> Tensor:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), in place.

    For every output unit i of every parameter W with gradient G::

        max_norm_i = clip_factor * max(||W_i||, eps)
        G_i <- G_i * max_norm_i / ||G_i||      if ||G_i|| > max_norm_i, else unchanged

    ``eps`` keeps zero-initialised weights (e.g. biases) from freezing. The units are local to a
    tensor, so with sharded parameters this is exact when each output row lives on one rank
    (row-wise/FSDP dim-0 shards, column-parallel layers); ``group`` is used only for the
    returned norm.

    Returns:
        The global 2-norm of the gradients *before* clipping (for logging).
    """
    given = _as_param_list(parameters)
    params = [p for p in given if p.grad is not None]
    total_norm = _total_norm(_Grads(given, None), 2.0, group)  # keeps GradPieces' marks
    for p in params:
        max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip_factor)
        grad_norm = _unitwise_norm(p.grad)
        # Clamp only to avoid 0/0 in units that are not clipped anyway (they get factor 1).
        tiny = torch.finfo(grad_norm.dtype).tiny
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=tiny), 1.0)
        p.grad.mul_(factor)
    return total_norm


# ---------------------------------------------------------------------------------------------
# 4. AutoClip: clip to a percentile of the history of norms
# ---------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) with linear interpolation, like ``numpy.percentile``."""
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _require(name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise a ValueError naming the setting, its value and what is allowed."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_number(value: Any) -> bool:
    """A real number (numpy scalars included), not a bool and not nan."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _is_count(value: Any, minimum: int) -> bool:
    """An integer (not a bool) >= minimum."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


class AutoClip:
    """Clip to the ``percentile``-th percentile of all global norms seen so far.

    Seetharaman et al. 2020. As in the paper's code, the current norm is appended to the
    history *before* the percentile is taken, so the very first step clips to its own norm
    (a factor n / (n + 1e-6): practically a no-op). Non-finite norms are not recorded and nothing is clipped: the training loop
    decides what to do with such a step, and one inf must not poison the history forever.

    Args:
        percentile: in (0, 100]; the paper's recommended value for its tasks is 10.
        history: keep only the last ``history`` norms (None: keep all, as in the paper).
    """

    method = "autoclip"

    def __init__(self, percentile: float = 10.0, history: int | None = None) -> None:
        _require(
            "percentile",
            percentile,
            _is_number(percentile) and 0 < percentile <= 100,
            "in (0, 100]",
        )
        _require(
            "history",
            history,
            history is None or _is_count(history, 1),
            "None or an integer >= 1",
        )
        self.percentile = float(percentile)
        self.max_history = history
        self.history: list[float] = []
        self.last_threshold: float | None = None

    @torch.no_grad()
    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor:
        """Clip in place; return the global 2-norm before clipping."""
        grads = _Grads(parameters, None)
        total_norm = _total_norm(grads, 2.0, group)
        norm = float(total_norm)  # the history lives on the CPU: one sync per step
        if not math.isfinite(norm):
            self.last_threshold = None
            return total_norm
        self.history.append(norm)
        if self.max_history is not None and len(self.history) > self.max_history:
            del self.history[: len(self.history) - self.max_history]
        self.last_threshold = _percentile(self.history, self.percentile)
        _scale_to_max_norm_(grads, self.last_threshold, total_norm)
        return total_norm

    def state_dict(self) -> dict[str, Any]:
        """The history (and the settings, for reference) as plain Python values."""
        return {
            "method": self.method,
            "percentile": self.percentile,
            "max_history": self.max_history,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history; the settings stay those given to the constructor."""
        _check_method(state, self.method)
        self.history = [float(x) for x in state["history"]]
        if self.max_history is not None:
            self.history = self.history[-self.max_history :]


# ---------------------------------------------------------------------------------------------
# 5. ZClip: z-score of an exponential moving average of the norm
# ---------------------------------------------------------------------------------------------


class ZClip:
    """Clip norm spikes detected by their z-score against EMA statistics (Kumar et al. 2025).

    What is implemented (the paper's default, and its reference code's EMA update):

    1. Warm-up: for the first ``warmup_steps`` steps only record the global 2-norm g (and clip
       to ``max_norm`` if one is given). Then mean = average, var = population variance.
    2. Each later step: sigma = sqrt(var), z = (g - mean) / (sigma + eps).
       - ``mode="zscore"`` (default, the paper's reciprocal clipping): if z > z_thresh, clip to
         ``mean + (z_thresh**2 / z) * sigma``: the bigger the spike, the harder it is clipped.
       - ``mode="percentile"`` (the simpler rule, named as in the reference code): if
         g > mean + z_thresh * sigma, clip to ``mean + z_thresh * sigma``.
       ``max_norm``, if given, is an extra fixed ceiling.
    3. Update the EMA with the *clipped* norm g' (g itself when not clipped), so a spike does
       not inflate the statistics:
       ``mean = alpha * mean + (1 - alpha) * g'`` then
       ``var = alpha * var + (1 - alpha) * (g' - mean)**2`` (with the updated mean).

    Non-finite norms are neither recorded nor clipped (see ``AutoClip``).
    """

    method = "zclip"
    MODES = ("zscore", "percentile")

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "zscore",
        eps: float = 1e-6,
        max_norm: float | None = None,
    ) -> None:
        _require("alpha", alpha, _is_number(alpha) and 0 < alpha < 1, "in (0, 1)")
        _require("z_thresh", z_thresh, _is_number(z_thresh) and z_thresh > 0, "> 0")
        _require(
            "warmup_steps",
            warmup_steps,
            _is_count(warmup_steps, 1),
            "an integer >= 1",
        )
        _require("mode", mode, mode in self.MODES, f"one of {self.MODES}")
        _require("eps", eps, _is_number(eps) and eps >= 0, ">= 0")
        _require(
            "max_norm",
            max_norm,
            max_norm is None or (_is_number(max_norm) and max_norm > 0),
            "None or > 0",
        )
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.eps = float(eps)
        self.max_norm = max_norm
        self.warmup_norms: list[float] = []
        self.mean: float | None = None  # None until the warm-up is over
        self.var: float | None = None
        self.last_threshold: float | None = None

    def _spike_threshold(self, norm: float) -> float | None:
        """The clipping threshold if ``norm`` is a spike, else None."""
        assert self.mean is not None and self.var is not None
        std = math.sqrt(self.var)
        if self.mode == "zscore":
            z = (norm - self.mean) / (std + self.eps)
            return self.mean + (self.z_thresh**2 / z) * std if z > self.z_thresh else None
        limit = self.mean + self.z_thresh * std
        return limit if norm > limit else None

    @torch.no_grad()
    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor:
        """Clip in place; return the global 2-norm before clipping."""
        grads = _Grads(parameters, None)
        total_norm = _total_norm(grads, 2.0, group)
        norm = float(total_norm)
        self.last_threshold = None
        if not math.isfinite(norm):
            return total_norm

        if self.mean is None:
            self.warmup_norms.append(norm)
            if len(self.warmup_norms) >= self.warmup_steps:
                n = len(self.warmup_norms)
                self.mean = sum(self.warmup_norms) / n
                self.var = sum((x - self.mean) ** 2 for x in self.warmup_norms) / n
                self.warmup_norms = []
            threshold = self.max_norm
        else:
            spike = self._spike_threshold(norm)
            effective = norm if spike is None else spike
            self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
            self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
            threshold = spike
            if self.max_norm is not None:
                threshold = self.max_norm if threshold is None else min(threshold, self.max_norm)

        if threshold is not None:
            self.last_threshold = threshold
            _scale_to_max_norm_(grads, threshold, total_norm)
        return total_norm

    def state_dict(self) -> dict[str, Any]:
        """Statistics (and settings, for reference) as plain Python values."""
        return {
            "method": self.method,
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "mode": self.mode,
            "eps": self.eps,
            "max_norm": self.max_norm,
            "warmup_norms": list(self.warmup_norms),
            "mean": self.mean,
            "var": self.var,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the statistics; the settings stay those given to the constructor."""
        _check_method(state, self.method)
        self.warmup_norms = [float(x) for x in state["warmup_norms"]]
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = None if state["var"] is None else float(state["var"])


# ---------------------------------------------------------------------------------------------
# 6. Helpers for the lesson
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def per_layer_grad_norms(module: nn.Module) -> dict[str, float]:
    """2-norm of each parameter's gradient, keyed by parameter name (None grads skipped)."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return {}
    # One transfer to the CPU for all values instead of one .item() per parameter.
    norms = torch.stack([torch.linalg.vector_norm(g).float().cpu() for _, g in named]).tolist()
    return {name: value for (name, _), value in zip(named, norms, strict=True)}


@torch.no_grad()
def snapshot_grads(parameters: Params) -> list[Tensor]:
    """Detached copies of the current gradients (None grads skipped), e.g. before clipping."""
    return [p.grad.detach().clone() for p in _as_param_list(parameters) if p.grad is not None]


@torch.no_grad()
def grad_cosine(before: list[Tensor], after: list[Tensor]) -> float:
    """Cosine similarity of two gradient lists, each flattened and concatenated into a vector.

    1.0 means the same direction (norm clipping); below 1 the clipping turned the update
    (value clipping, AGC). Returns nan if either vector is all zeros (no direction).
    """
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} tensors but after has {len(after)}")
    if not before:
        raise ValueError("grad_cosine needs at least one tensor")
    # float64 so that "exactly the same direction" reads as 1.0, not 0.99999994.
    a = torch.cat([t.detach().reshape(-1).double().cpu() for t in before])
    b = torch.cat([t.detach().reshape(-1).double().cpu() for t in after])
    if a.numel() != b.numel():
        raise ValueError(f"before has {a.numel()} elements but after has {b.numel()}")
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    if denom == 0:
        return math.nan
    return float(torch.dot(a, b) / denom)


# ---------------------------------------------------------------------------------------------
# 7. make_clipper: one object the training loop calls every optimizer step
# ---------------------------------------------------------------------------------------------


class Clipper(Protocol):
    """What the training loop relies on: call it, checkpoint it."""

    method: str

    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_method(state: dict[str, Any], method: str) -> None:
    found = state.get("method", method)
    if found != method:
        raise ValueError(f"state_dict is for clip method {found!r}, but this clipper is {method!r}")


class _StatelessClipper:
    """Base for the clippers with nothing to checkpoint but their name."""

    method = ""

    def state_dict(self) -> dict[str, Any]:
        """Only the method name (so a mismatched checkpoint is caught on load)."""
        return {"method": self.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the method name; there is no state to restore."""
        _check_method(state, self.method)


class _NoClip(_StatelessClipper):
    method = "none"

    def __init__(self, norm_type: float) -> None:
        self.norm_type = norm_type

    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor:
        return global_grad_norm(parameters, self.norm_type, group=group)


class _NormClip(_StatelessClipper):
    method = "norm"

    def __init__(self, max_norm: float, norm_type: float) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type

    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor:
        return clip_grad_norm_(parameters, self.max_norm, self.norm_type, group=group)


class _ValueClip(_StatelessClipper):
    method = "value"

    def __init__(self, clip_value: float, norm_type: float) -> None:
        self.clip_value, self.norm_type = clip_value, norm_type

    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor:
        params = _as_param_list(parameters)
        total_norm = global_grad_norm(params, self.norm_type, group=group)
        clip_grad_value_(params, self.clip_value)
        return total_norm


class _AGCClip(_StatelessClipper):
    method = "agc"

    def __init__(self, clip_factor: float) -> None:
        self.clip_factor = clip_factor

    def __call__(
        self, parameters: Params, group: ProcessGroup | Sequence[ProcessGroup] | None = None
    ) -> Tensor:
        return adaptive_clip_grad_(parameters, self.clip_factor, group=group)


def make_clipper(
    method: str,
    *,
    max_norm: float = 1.0,
    clip_value: float = 1.0,
    agc_clip_factor: float = 0.01,
    autoclip_percentile: float = 10.0,
    zclip_z: float = 2.5,
    zclip_alpha: float = 0.97,
    zclip_warmup_steps: int = 25,
    norm_type: float = 2.0,
) -> Clipper:
    """Build the clipper for ``method`` (one of ``CLIP_METHODS``).

    The result is called once per optimizer step, after gradients are synchronised, as
    ``clipper(params, group=...)``; it clips in place and returns the global norm *before*
    clipping (``norm_type``-norm for "none", "norm" and "value"; the 2-norm for the others,
    which are defined with it). Only the settings the method uses are validated.
    """
    if method not in CLIP_METHODS:
        raise ValueError(f"method must be one of {CLIP_METHODS}, got {method!r}")
    _require(
        "norm_type", norm_type, _is_number(norm_type) and norm_type > 0, "> 0 (or float('inf'))"
    )
    if method == "none":
        return _NoClip(norm_type)
    if method == "norm":
        _require("max_norm", max_norm, _is_number(max_norm) and max_norm > 0, "> 0")
        return _NormClip(max_norm, norm_type)
    if method == "value":
        _require("clip_value", clip_value, _is_number(clip_value) and clip_value > 0, "> 0")
        return _ValueClip(clip_value, norm_type)
    if method == "agc":
        _require(
            "agc_clip_factor",
            agc_clip_factor,
            _is_number(agc_clip_factor) and agc_clip_factor > 0,
            "> 0",
        )
        return _AGCClip(agc_clip_factor)
    if method == "autoclip":
        _require(
            "autoclip_percentile",
            autoclip_percentile,
            _is_number(autoclip_percentile) and 0 < autoclip_percentile <= 100,
            "in (0, 100]",
        )
        return AutoClip(percentile=autoclip_percentile)
    _require("zclip_z", zclip_z, _is_number(zclip_z) and zclip_z > 0, "> 0")
    _require(
        "zclip_alpha", zclip_alpha, _is_number(zclip_alpha) and 0 < zclip_alpha < 1, "in (0, 1)"
    )
    _require(
        "zclip_warmup_steps",
        zclip_warmup_steps,
        isinstance(zclip_warmup_steps, int) and zclip_warmup_steps >= 1,
        "an integer >= 1",
    )
    return ZClip(alpha=zclip_alpha, z_thresh=zclip_z, warmup_steps=zclip_warmup_steps)
