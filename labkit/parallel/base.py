"""The strategy interface: how a model is placed and how its gradients are synchronised.

The training loop (``labkit.train``) owns the order of a step: forward/backward over the
micro-batches, gradient sync, unscale, clip, optimizer step, scheduler step, metrics. A strategy
supplies the pieces that differ between single-process, data-parallel, sharded, pipeline and
tensor-parallel training. ``Strategy`` itself is the single-process strategy; the parallel ones
override what they must, so each parallel file reads as "what changes, and why".
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.config import TrainConfig
from labkit.data import shard_rows
from labkit.model import GPT, lm_loss_sum
from labkit.timeline import Timeline


@dataclass
class DistContext:
    """Who this process is: its rank, the world size, its device and its process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (even with one rank)."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.distributed:
            dist.barrier()


class Strategy:
    """Single-process training; the base class of every parallel strategy.

    Attributes a subclass may set: ``model`` (the module the loop calls), ``module`` (the
    unwrapped GPT, whose parameter names define the state dict), ``clip_group`` (the process group
    whose ranks hold disjoint pieces of the gradients, None when gradients are replicated).
    """

    name = "single"
    # True where communication blocks inside forward/backward (tensor parallel): see
    # Timeline.durations.
    nested_comm = False

    def __init__(self, cfg: TrainConfig, ctx: DistContext, model: GPT) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.timeline = Timeline(ctx.rank, enabled=cfg.timeline)
        self.clip_group: Any = None
        self.comm_bytes = 0  # bytes this rank sent in the current step (see ring_bytes)
        self.scaler: torch.amp.GradScaler | None = None
        self.module = model.to(ctx.device)
        self.model: nn.Module = self.module
        self.setup()

    # ------------------------------------------------------------------ placement
    def setup(self) -> None:
        """Wrap or shard ``self.module`` (subclasses); the single strategy keeps it as it is."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this rank optimises and clips (its shard or stage, if sharded)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over ``trainable_parameters()``."""
        cls, kwargs = self.cfg.optimizer_spec()
        return cls(self.trainable_parameters(), **kwargs)

    # ------------------------------------------------------------------ data
    @property
    def dp_size(self) -> int:
        """How many ranks share the batch (each takes a slice); gradients are averaged over them."""
        return 1

    @property
    def dp_rank(self) -> int:
        """This rank's index among the ranks that share the batch."""
        return 0

    def batch_rows(self, n_rows: int) -> slice:
        """Rows of the global batch this rank consumes."""
        return shard_rows(n_rows, self.dp_rank, self.dp_size)

    # ------------------------------------------------------------------ one step
    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed-precision context for the forward pass (a no-op in fp32)."""
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    def no_sync(self) -> AbstractContextManager[Any]:
        """Context in which backward does not synchronise gradients (accumulation)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through ``loss``, through the loss scaler when fp16 is on."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], n_tokens: int, step: int
    ) -> torch.Tensor:
        """Run forward and backward over this rank's micro-batches; return its summed token loss.

        Each micro-batch's loss is ``sum / n_tokens`` (``n_tokens``: tokens in the *global* batch)
        times ``dp_size``, because the sync averages over ``dp_size`` ranks. Then the gradients
        equal those of the mean loss over the global batch exactly, however unevenly it is split.
        Only the last micro-batch synchronises; the others accumulate under ``no_sync``.
        """
        total = torch.zeros((), device=self.ctx.device)
        scale = self.dp_size / n_tokens
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else self.no_sync():
                with self.timeline.span("forward", step, i), self.autocast():
                    loss_sum = lm_loss_sum(self.model(x), y)
                with self.timeline.span("backward", step, i):
                    self.backward(loss_sum * scale)
            total += loss_sum.detach()
        return total

    def finish_grad_sync(self, step: int) -> None:
        """Complete gradient synchronisation after the last backward (DP strategies)."""

    def clip_gradients(self, clipper: Any) -> torch.Tensor:
        """Clip this rank's gradients by the global norm; return the pre-clip global norm.

        ``clipper`` is a ``labkit.clip.make_clipper`` object. ``clip_group`` tells it which ranks
        hold disjoint pieces whose contributions must be combined.
        """
        return clipper(self.trainable_parameters(), group=self.clip_group)

    def grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the current gradients (after clipping, for the metrics)."""
        from labkit.clip import global_grad_norm

        return global_grad_norm(self.trainable_parameters(), group=self.clip_group)

    def reduce_loss(self, local_loss_sum: torch.Tensor) -> float:
        """The global batch's summed loss from this rank's part (identical on every rank)."""
        return float(local_loss_sum)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean validation loss per token over ``batches`` (every rank returns the same value)."""
        total = tokens = 0.0
        for x, y in batches:
            x, y = x.to(self.ctx.device), y.to(self.ctx.device)
            with self.autocast():
                total += float(lm_loss_sum(self.model(x), y))
            tokens += y.numel()
        return total / tokens

    # ------------------------------------------------------------------ state
    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's model state, for its checkpoint file."""
        return self.module.state_dict()

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore this rank's model state from its checkpoint file."""
        self.module.load_state_dict(state)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's parameters on CPU, keyed as ``GPT.state_dict()`` (on rank 0).

        A collective for sharded strategies: every rank must call it; ranks other than 0 may
        return None.
        """
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def close(self) -> None:
        """Release hooks or communication resources."""


def all_reduce_sum(value: torch.Tensor, group: Any = None) -> torch.Tensor:
    """SUM-all-reduce a tensor in place (and return it); a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


# What one rank sends in a ring implementation of each collective, per byte of the full tensor
# (the convention of nccl-tests' "bus bandwidth"): an all-reduce is a reduce-scatter plus an
# all-gather, each moving (N-1)/N of the tensor through every rank.
RING_FACTORS = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "allgather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
}


def ring_bytes(nbytes: int, world_size: int, collective: str) -> int:
    """Bytes one rank sends for a ring ``collective`` over a tensor of ``nbytes`` bytes.

    Every strategy counts ``comm_bytes`` this way, so the column compares across strategies and
    with the formulas of the lessons.
    """
    return int(RING_FACTORS[collective](world_size) * nbytes)
