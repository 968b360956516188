"""The strategy: how a model is placed on the mesh and how its gradients are synchronised.

The training loop (``labkit.train``) owns the order of a step: forward/backward over the
micro-batches, gradient sync, unscale, clip, optimizer step, scheduler step, metrics. A strategy
supplies the pieces that differ between meshes: ``Strategy`` places the pipeline stage and the
tensor-parallel slices and reduces over the right dimensions; each data-parallel flavour is a
subclass that overrides what it must, so each parallel file reads as "what changes, and why".
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.clip import GradPieces, global_grad_norm, norm_collectives, per_layer_grad_norms
from labkit.data import shard_rows
from labkit.memory import SavedTensorMeter, state_bytes, storage_bytes, storage_ids
from labkit.model import GPT, lm_loss_sum
from labkit.timeline import Timeline

if TYPE_CHECKING:
    from labkit.config import TrainConfig


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
    """One rank's share of a run on the mesh: its pipeline stage, tensor-parallel slices, replica.

    The base class does every dimension but data parallelism: it cuts the model into the
    pipeline stage this rank runs (``pp > 1``, ``labkit.parallel.pipeline``), swaps in the
    tensor-parallel layers of its slice (``tp > 1``, ``labkit.parallel.tensor_parallel``), and
    reduces loss and clipping norm over the right dimensions. A data-parallel flavour
    (``dp_impl``) is a subclass that overrides only what differs: ``setup`` (wrap or shard),
    ``no_sync``, ``finish_grad_sync``, ``make_optimizer``, ``clip_pieces`` and the state dicts.
    With a mesh of one rank it is the single-process strategy.

    Attributes: ``model`` (the module the loop calls), ``module`` (the unwrapped GPT, pruned to
    this stage, whose parameter names define the state dict), ``mesh`` (``labkit.parallel.mesh``).
    """

    # True for data-parallel flavours whose ranks each keep only a piece of every gradient: the
    # clipping norm then combines pieces over dp too.
    grads_sharded = False
    # True where a flavour communicates inside forward/backward (ZeRO-3's gathers).
    gathers_in_forward = False

    def __init__(self, cfg: TrainConfig, ctx: DistContext, model: GPT) -> None:
        from labkit.parallel.mesh import Mesh

        self.cfg = cfg
        self.ctx = ctx
        self.timeline = Timeline(ctx.rank, enabled=cfg.timeline)
        self.bytes_sent = dict.fromkeys(("dp", "pp", "cp", "tp"), 0)  # this step, per dimension
        self.scaler: torch.amp.GradScaler | None = None
        shape = cfg.mesh_shape if ctx.distributed else dict.fromkeys(cfg.mesh_shape, 1)
        self.mesh = Mesh(shape, ctx.rank if ctx.distributed else 0, ctx.device.type)
        self.full_keys = list(model.state_dict())  # to order full_state_dict like GPT's
        self._step, self._recording = 0, True
        self.activation_meter = SavedTensorMeter(exclude=self.param_storage_ids)
        self._state_bytes = {"grads_bytes": 0, "optimizer_bytes": 0}
        self.pipe: Any = None
        if self.mesh.size("pp") > 1:
            from labkit.parallel.pipeline import make_pipeline

            self.pipe = make_pipeline(self, model)  # prunes model to this rank's stage
        self.tp_shard_dims: dict[str, int] = {}  # tensor-parallel parameter -> dim it is split on
        if self.mesh.size("tp") > 1:
            from labkit.parallel.tensor_parallel import apply_tensor_parallel

            self.tp_shard_dims = apply_tensor_parallel(
                model, self.mesh.group("tp"), self._on_tp_comm
            )
        if self.mesh.size("cp") > 1:
            from labkit.parallel.context_parallel import apply_context_parallel

            apply_context_parallel(model, self.mesh.group("cp"), self._on_cp_send)
        self.module = model.to(ctx.device)
        self.model: nn.Module = self.module
        self.setup()
        clip_dims = ("pp", "tp", *(("dp",) if self.grads_sharded else ()))
        if cfg.bug == "A":  # seeded: the clip norm is not combined across pipeline stages
            clip_dims = clip_dims[1:]
        self.clip_group: Any = self.mesh.group(*clip_dims)
        if self.pipe is not None:
            self.pipe.start()

    def sent(self, dim: str, nbytes: int) -> None:
        """Count ``nbytes`` this rank sent over mesh dimension ``dim`` in the current step."""
        self.bytes_sent[dim] += int(nbytes)

    @property
    def comm_bytes(self) -> int:
        """Bytes this rank sent in the current step, over every dimension."""
        return sum(self.bytes_sent.values())

    # ------------------------------------------------------------------ placement
    def setup(self) -> None:
        """Wrap or shard ``self.module`` over dp (subclasses); the base keeps it as it is."""

    @property
    def nested_comm(self) -> bool:
        """True where communication blocks inside forward/backward (see Timeline.durations)."""
        return self.mesh.size("tp") > 1 or self.mesh.size("cp") > 1 or self.gathers_in_forward

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this rank optimises (its stage and slices)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over ``trainable_parameters()``."""
        cls, kwargs = self.cfg.optimizer_spec()
        return cls(self.trainable_parameters(), **kwargs)

    # ------------------------------------------------------------------ data
    @property
    def dp_size(self) -> int:
        """How many replicas share the batch (each takes a slice); gradients average over them."""
        return self.mesh.size("dp")

    @property
    def dp_rank(self) -> int:
        """This rank's replica index."""
        return self.mesh.local_rank("dp")

    @property
    def sync_size(self) -> int:
        """How many ranks average their gradients: the dp replicas times the cp ranks of each,
        whose gradients each cover part of every sequence."""
        return self.mesh.size("dp") * self.mesh.size("cp")

    def batch_rows(self, n_rows: int) -> slice:
        """Rows of the global batch this rank consumes (its replica's slice)."""
        return shard_rows(n_rows, self.dp_rank, self.dp_size)

    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a global batch: its replica's rows, and with cp > 1 its zig-zag
        piece of each sequence."""
        rows = self.batch_rows(len(x))
        return self._sequence_piece(x[rows], y[rows])

    def _sequence_piece(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With cp > 1, this rank's zig-zag piece of every sequence; otherwise all of them."""
        if self.mesh.size("cp") == 1:
            return x, y
        from labkit.parallel.context_parallel import shard_sequences

        return shard_sequences(x, y, self.mesh.local_rank("cp"), self.mesh.size("cp"))

    # ------------------------------------------------------------------ one step
    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed-precision context for the forward pass (a no-op in fp32)."""
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    def no_sync(self) -> AbstractContextManager[Any]:
        """Context in which backward does not synchronise gradients over dp (accumulation)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through ``loss``, through the loss scaler when fp16 is on."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], n_tokens: int, step: int
    ) -> torch.Tensor:
        """Run forward and backward over this rank's micro-batches; return its summed token loss.

        Each micro-batch's loss is ``sum / n_tokens`` (``n_tokens``: tokens in the *global* batch)
        times ``sync_size``, because the sync averages over ``sync_size`` ranks. Then the gradients
        equal those of the mean loss over the global batch exactly, however unevenly it is split.
        Only the last micro-batch synchronises; the others accumulate under ``no_sync``. With a
        pipeline, its schedule runs the micro-batches instead (same scaling, same rule).
        """
        self._step = step
        bug = self.cfg.bug  # the bug zoo (labkit.bugs): None unless a facilitator seeds one
        if self.pipe is not None:
            scale = self.sync_size / n_tokens
            if bug == "B":  # seeded: the loss divided by the micro-batch count a second time
                scale /= self.cfg.micro_batches
            return self.pipe.forward_backward(micro_batches, scale, step)
        total = torch.zeros((), device=self.ctx.device)
        scale = self.sync_size / n_tokens
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            hold = not last and bug != "D"  # seeded D: accumulation without no_sync()
            with self.no_sync() if hold else nullcontext():
                with self.timeline.span("forward", step, i), self.autocast():
                    loss_sum = lm_loss_sum(self.model(x), y)
                with self.timeline.span("backward", step, i):
                    self.backward(loss_sum * scale)
            if not last and not hold:
                self.finish_grad_sync(step)  # the all-reduce it just did, counted and drawn
            total += loss_sum.detach()
        return total

    def finish_grad_sync(self, step: int) -> None:
        """Complete gradient synchronisation after the last backward (data-parallel flavours)."""

    def _on_tp_comm(self, tensor: torch.Tensor, start: float, end: float) -> None:
        """Tensor parallelism's all-reduces, recorded where they ran (not during evaluation)."""
        if not self._recording:
            return
        self.sent(
            "tp",
            ring_bytes(tensor.numel() * tensor.element_size(), self.mesh.size("tp"), "allreduce"),
        )
        t0 = self.timeline.t0
        self.timeline.add("allreduce", self._step, -1, start - t0, end - t0)

    def _on_cp_send(self, nbytes: int) -> None:
        """Ring attention's key/value (and their gradients') sends, counted as they leave."""
        if self._recording:
            self.sent("cp", nbytes)

    # ------------------------------------------------------------------ clipping
    def clip_pieces(self) -> list[tuple[torch.Tensor, bool]]:
        """This rank's gradient pieces: (tensor whose ``.grad`` is the piece, replicated over tp).

        Parameters a tensor-parallel slice holds whole (embeddings, norms, biases of row-parallel
        layers) are replicated over tp; the others are split. Flavours that shard gradients over
        dp return their shards instead.
        """
        return [
            (p, name not in self.tp_shard_dims)
            for name, p in self.module.named_parameters()
            if p.requires_grad
        ]

    def _grad_pieces(self) -> list[torch.Tensor]:
        """The pieces whose norms, combined over ``clip_group``, make the global norm.

        Every piece is clipped; a piece replicated over tp is *counted* on tp rank 0 only, so it
        enters the norm once (pieces replicated over dp are not combined over dp at all).
        """
        pieces = self.clip_pieces()
        counted_everywhere = self.cfg.bug == "C"  # seeded: replicated pieces counted tp times
        if self.mesh.size("tp") == 1 or self.mesh.local_rank("tp") == 0 or counted_everywhere:
            return [t for t, _ in pieces]
        return GradPieces([t for t, _ in pieces], counted=[not rep for _, rep in pieces])

    def clip_gradients(self, clipper: Any) -> torch.Tensor:
        """Clip this rank's gradients by the global norm; return the pre-clip global norm.

        ``clipper`` is a ``labkit.clip.make_clipper`` object; ``clip_group`` spans the mesh
        dimensions over which ranks hold disjoint pieces (pp stages, tp slices, dp shards).
        """
        with norm_collectives(self._on_norm_comm):
            return clipper(self._grad_pieces(), group=self.clip_group)

    def _on_norm_comm(self, start: float, end: float) -> None:
        """The clip norm's all-reduce: the optimizer span's wait for the other ranks."""
        if self._recording:
            t0 = self.timeline.t0
            self.timeline.add("norm_allreduce", self._step, -1, start - t0, end - t0)

    def grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the current gradients (after clipping, for the metrics)."""
        with norm_collectives(self._on_norm_comm):
            return global_grad_norm(self._grad_pieces(), group=self.clip_group)

    def reduce_loss(self, local_loss_sum: torch.Tensor) -> float:
        """The global batch's summed loss (identical on every rank).

        The pipeline stage that scores the loss (``pipe.loss_stage``) holds its replica's loss:
        broadcast over pp; the replicas' sums (and each cp rank's, over its tokens) add up over
        dp and cp; tp slices computed the same loss.
        """
        value = local_loss_sum.detach().clone()
        if self.mesh.size("pp") > 1:
            dist.broadcast(value, group=self.mesh.group("pp"), group_src=self.pipe.loss_stage)
        if self.sync_size > 1:
            dist.all_reduce(value, group=self.mesh.group("dp", "cp"))
        return float(value)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean validation loss per token over ``batches`` (every rank returns the same value)."""
        self._recording = False
        try:
            if self.pipe is not None:
                return self.pipe.evaluate(batches)
            # On the run's device: NCCL all-reduces only CUDA tensors.
            total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
            tokens = 0
            cp = self.mesh.size("cp")
            for x, y in batches:
                tokens += y.numel()
                x, y = self._sequence_piece(x, y)  # each cp rank scores its piece; sums add up
                x, y = x.to(self.ctx.device), y.to(self.ctx.device)
                with self.autocast():
                    total += float(lm_loss_sum(self.model(x), y))
            if cp > 1:
                dist.all_reduce(total, group=self.mesh.group("cp"))
            return float(total) / tokens
        finally:
            self._recording = True

    # ------------------------------------------------------------------ state
    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's model state, for its checkpoint file."""
        return self.module.state_dict()

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore this rank's model state from its checkpoint file."""
        self.module.load_state_dict(state)

    def replica_state_dict(self) -> dict[str, torch.Tensor] | None:
        """This rank's stage and slices, unsharded over dp, on CPU (a collective over dp for
        flavours that shard parameters; needed on dp rank 0 only)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's parameters on CPU, keyed as ``GPT.state_dict()``, on rank 0.

        A collective: every rank must call it; ranks other than 0 return None. Rank 0 joins the
        pipeline stages and concatenates the tensor-parallel slices of replica 0.
        """
        local = self.replica_state_dict()
        if self.mesh.size("pp") == 1 and self.mesh.size("tp") == 1:
            return local if self.ctx.rank == 0 else None
        # Each part carries its own split dims: rank 0's stage does not know the others' layers.
        part = (
            (self.mesh.local_rank("tp"), local, self.tp_shard_dims)
            if self.dp_rank == 0 and self.mesh.local_rank("cp") == 0
            else None
        )
        parts: list[Any] | None = [None] * self.mesh.world_size if self.ctx.rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if parts is None:
            return None
        slices: dict[str, dict[int, torch.Tensor]] = {}
        split_dims: dict[str, int] = {}
        for entry in parts:
            if entry is not None:
                tp_rank, state, dims = entry
                split_dims.update(dims)
                for key, tensor in state.items():
                    slices.setdefault(key, {})[tp_rank] = tensor
        full = {}
        for key in self.full_keys:
            pieces = slices[key]
            if key in split_dims:
                full[key] = torch.cat([pieces[r] for r in sorted(pieces)], split_dims[key])
            else:
                full[key] = pieces[min(pieces)]
        return full

    def layer_grad_norms(self) -> dict[str, float]:
        """Each parameter's gradient norm on this rank (``TrainConfig.layer_norms``); flavours
        whose gradients live in shards override it."""
        return per_layer_grad_norms(self.module)

    def param_storage_ids(self) -> set[int]:
        """The storages that hold parameters (flavours with flat buffers add theirs)."""
        return storage_ids(self.module.parameters())

    def note_state_bytes(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure gradient and optimizer-state bytes now (the trainer calls it before a step)."""
        now = state_bytes(self.trainable_parameters(), optimizer)
        for key, value in now.items():
            self._state_bytes[key] = max(self._state_bytes[key], value)

    def params_memory(self) -> dict[str, int]:
        """Bytes of parameter storage now and at the peak (subclasses that gather track it)."""
        total = storage_bytes(self.module.parameters())
        return {"params_bytes": total, "peak_params_bytes": total}

    def memory_stats(self) -> dict[str, int]:
        """This rank's measured bytes: parameters (now, peak), gradients, optimizer state,
        activations saved for backward (peak), and ``peak_bytes``.

        ``peak_bytes`` is the CUDA allocator's peak on a GPU; on CPU, where no allocator keeps
        one, the sum of the categories' peaks (an upper bound: they need not peak together).
        """
        stats = {**self.params_memory(), **self._state_bytes}
        stats["activations_bytes"] = self.activation_meter.peak
        if self.ctx.device.type == "cuda":
            stats["peak_bytes"] = torch.cuda.max_memory_allocated(self.ctx.device)
        else:
            stats["peak_bytes"] = (
                stats["peak_params_bytes"]
                + stats["grads_bytes"]
                + stats["optimizer_bytes"]
                + stats["activations_bytes"]
            )
        return stats

    def close(self) -> None:
        """Release hooks or communication resources."""
        if self.pipe is not None:
            self.pipe.close()


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
