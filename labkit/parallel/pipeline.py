"""Pipeline parallelism: the GPT cut into stages, one stage per rank, micro-batches flowing through.

Read this file top to bottom:

1. **Cutting the model.** ``GPT.layers()`` lists ``embed, blocks.0 .. blocks.{L-1}, head``. We cut
   that list into ``p = pp`` contiguous stages, balanced by number of layers or by number
   of parameters (``TrainConfig.pp_balance``). Every rank builds the *whole* GPT from the same seed
   and then replaces the layers it does not own by ``nn.Identity`` placeholders. So the parameters
   it keeps have their original names (``blocks.1.attn.q.weight``), and the pruned GPT's own
   ``forward`` is exactly this stage's forward: the placeholders pass activations through.
2. **Schedules**, written out as the list of actions one stage performs, ``("F", i)`` for the
   forward of micro-batch ``i`` and ``("B", i)`` for its backward, live in
   ``labkit.parallel.pp_orders``: ``gpipe_order`` (all forwards, then all backwards) and
   ``one_f_one_b_order`` (a few warm-up forwards, then one forward / one backward, then the
   remaining backwards), and the newer interleaved and zero-bubble orders. Print them!
3. **Running a schedule** (``Pipeline``, one stage of one pipeline of the mesh): a forward receives the activation
   ``[rows, T, d_model]`` from the previous stage, runs the stage, and sends its output on; a
   backward receives the gradient of that output from the next stage, back-propagates, and sends
   the gradient of its input back. The last stage computes the loss. With
   ``pp_virtual_stages = v > 1`` (interleaved 1F1B) the model is cut into ``p * v`` chunks and
   rank ``r`` runs chunks ``r, r + p, ...``: the last rank's output wraps round to the first,
   and every message carries a tag naming its micro-batch and chunk. Under ``zb-h1`` a backward
   ("B") computes only the input's gradient and a later "W" action the weights'
   (``labkit.parallel.split_backward``). Shapes are known from the
   batch every rank can compute for itself, so no shape handshake is needed. Naive model
   parallelism is this same code with ``micro_batches=1``.
4. ``TorchPipeline``: the same stages run by ``torch.distributed.pipelining``
   (``PipelineStage`` + ``Schedule1F1B`` or ``ScheduleGPipe``; one stage per chunk with
   ``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble`` or ``ScheduleZBVZeroBubble``),
   to compare against.
The analysis of a run's timeline (bubble fraction, activation peaks) is notebook-facing and
lives in ``labkit.lessons.pipeline_timeline``.

Timeline conventions: every forward, backward, send and recv is recorded with the step and the
micro-batch index *within the optimizer step*: with ``grad_accum_steps = k`` the step runs k
pipeline flushes one after the other, and flush ``c`` uses indices ``c*m .. c*m + m - 1``.
Sends are non-blocking (``isend``): a "send" event is the time to post it; the wait for all sends
to complete, at the end of the step, is one "wait" event.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.data import shard_rows, split_micro_batches
from labkit.model import GPT, count_params, lm_loss_sum
from labkit.parallel.pp_orders import ORDERS, Order, gpipe_order, one_f_one_b_order
from labkit.parallel.split_backward import WeightGradStash, split_linear_layers

__all__ = [
    "ORDERS",
    "Order",
    "Pipeline",
    "TorchPipeline",
    "gpipe_order",
    "keep_chunks",
    "keep_stage",
    "make_pipeline",
    "one_f_one_b_order",
    "split_by_cost",
    "split_by_layers",
    "stage_bounds",
]

# The residual stream stays float32 even under bf16 autocast (x + f(x) promotes), so activations
# and their gradients travel between stages in float32.
ACTIVATION_DTYPE = torch.float32


# ---------------------------------------------------------------------------------------------
# 1. Cutting the model into stages
# ---------------------------------------------------------------------------------------------


def split_by_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """``(start, stop)`` layer ranges with equal counts; the first stages take any extra layer.

    The first stage holds the embedding, which costs almost nothing to run, so it is the right
    one to give an extra layer to.
    """
    return [(s.start, s.stop) for s in (shard_rows(n_layers, i, n_stages) for i in range(n_stages))]


def split_by_cost(costs: list[int], n_stages: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty ``(start, stop)`` ranges that minimise the largest stage's cost.

    Dynamic programming: ``best[k][i]`` is the smallest achievable "largest stage" when the first
    ``i`` layers form ``k`` stages; the last of those stages is ``layers[j:i]`` for the best ``j``.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} non-empty stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, stop = [], n
    for k in range(n_stages, 0, -1):
        start = cut[k][stop]
        bounds.append((start, stop))
        stop = start
    return bounds[::-1]


def stage_bounds(model: GPT, n_stages: int, balance: str = "layers") -> list[tuple[int, int]]:
    """Which of ``model.layers()`` each stage runs: ``balance`` is "layers" or "params"."""
    layers = model.layers()
    if n_stages > len(layers):
        raise ValueError(
            f"TrainConfig.world_size={n_stages} is invalid: the model has only {len(layers)} "
            "layers (embedding, blocks, head) to cut into stages"
        )
    if balance == "layers":
        return split_by_layers(len(layers), n_stages)
    if balance == "params":
        return split_by_cost([count_params(layer) for layer in layers], n_stages)
    raise ValueError(f"TrainConfig.pp_balance={balance!r} is invalid: allowed: 'layers', 'params'")


def keep_stage(model: GPT, start: int, stop: int) -> None:
    """Replace every layer outside ``layers()[start:stop]`` by an ``nn.Identity``, in place."""
    keep_chunks(model, [(start, stop)])


def keep_chunks(model: GPT, bounds: list[tuple[int, int]]) -> None:
    """Replace every layer outside all the ``(start, stop)`` ranges by an ``nn.Identity``."""
    for index, name in enumerate(model.layer_names()):
        if not any(start <= index < stop for start, stop in bounds):
            model.set_submodule(name, nn.Identity())


# ---------------------------------------------------------------------------------------------
# 2. Schedules: the order in which one stage runs forwards and backwards (``pp_orders``)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 3. Running a schedule: this rank's stage of one pipeline of the mesh
# ---------------------------------------------------------------------------------------------


class Pipeline:
    """This rank's stage: cuts the model, runs the schedule, sends and receives activations.

    Built by the ``Strategy`` (which owns the module, its data-parallel wrapper and the
    timeline). The neighbours are the ranks one stage up and down *in this rank's pipeline*:
    same dp replica, same tp slice (``Mesh.peer``). With tensor parallelism every slice of a
    stage holds the whole activation, so slice ``t`` sends to slice ``t`` of the next stage.
    """

    def __init__(self, strategy: Any, model: GPT) -> None:
        self.s = strategy
        mesh, cfg = strategy.mesh, strategy.cfg
        self.n_stages, self.stage = mesh.size("pp"), mesh.local_rank("pp")
        p = self.n_stages
        self.is_first, self.is_last = self.stage == 0, self.stage == p - 1
        self.prev = mesh.peer("pp", self.stage - 1) if not self.is_first else None
        self.next = mesh.peer("pp", self.stage + 1) if not self.is_last else None
        # With v chunks per rank the ring wraps: chunk c of the last rank feeds chunk c + 1 of
        # the first, so every rank has a neighbour on both sides.
        self.prev_rank = mesh.peer("pp", (self.stage - 1) % p)
        self.next_rank = mesh.peer("pp", (self.stage + 1) % p)
        self.group = mesh.group("pp")
        self.width = model.cfg.d_model
        self.n_chunks = cfg.pp_virtual_stages
        self.n_virtual = p * self.n_chunks
        self.bounds = stage_bounds(model, self.n_virtual, cfg.pp_balance)
        # Rank r runs virtual stages r, r + p, r + 2p, ...: chunk c is virtual stage c * p + r.
        # torch's ZBV schedule places two chunks in a V instead: r on the way down, 2p - 1 - r
        # on the way back, so the last rank hands its first chunk's output to itself.
        self.v_shape = cfg.pp_schedule == "torch-zbv"
        if self.v_shape:
            self.placement = [self.stage, 2 * p - 1 - self.stage]
        else:
            self.placement = [c * p + self.stage for c in range(self.n_chunks)]
        mine = [self.bounds[vs] for vs in self.placement]
        # Who reads the tokens and who scores the loss: the owners of the first and last virtual
        # stages (rank 0 and rank p - 1, except in a V, where rank 0 holds both ends).
        self.holds_input = 0 in self.placement
        self.holds_loss = self.n_virtual - 1 in self.placement
        self.loss_stage = self._owner_stage(self.n_virtual - 1)
        names = model.layer_names()
        self.chunk_layer_names = [names[start:stop] for start, stop in mine]
        self.stage_layer_names = [n for chunk in self.chunk_layer_names for n in chunk]
        keep_chunks(model, mine)
        self.order_fn = ORDERS.get(cfg.pp_schedule)
        self.stash: WeightGradStash | None = None
        if cfg.pp_schedule == "zb-h1":
            self.stash = WeightGradStash(keep=strategy.activation_meter.keep)
            split_linear_layers(model, self.stash)
        self._pending: list[tuple[Any, torch.Tensor]] = []  # isend works and their tensors

    def start(self) -> None:
        """Called once the module is wrapped (torch's schedules build their stage here)."""
        module = self.s.module
        self.chunk_layers = [[module.get_submodule(n) for n in c] for c in self.chunk_layer_names]

    def order(self, n_micro: int) -> Order:
        """This stage's actions for ``n_micro`` micro-batches (see ``gpipe_order``)."""
        if self.n_chunks == 1:
            return self.order_fn(n_micro, self.stage, self.n_stages)
        return self.order_fn(n_micro, self.stage, self.n_stages, self.n_chunks)

    def _virtual(self, chunk: int) -> int:
        return self.placement[chunk]

    def _owner_stage(self, virtual_stage: int) -> int:
        """The pipeline rank (pp coordinate) that runs ``virtual_stage``."""
        p = self.n_stages
        if self.v_shape:
            return virtual_stage if virtual_stage < p else 2 * p - 1 - virtual_stage
        return virtual_stage % p

    def _owner(self, virtual_stage: int) -> int:
        """The global rank that runs ``virtual_stage``."""
        return self.s.mesh.peer("pp", self._owner_stage(virtual_stage))

    def _tag(self, mb: int, virtual_stage: int, gradient: bool) -> int:
        """A tag per message: the activation going into a virtual stage, or the gradient of its
        output. Between two ranks both kinds flow both ways once chunks wrap around (p = 2:
        rank 0 sends activations and gradients to rank 1), so the order of posting alone cannot
        tell a receiver which message is which."""
        return 1 + 2 * (mb * self.n_virtual + virtual_stage) + int(gradient)

    def _run_chunk(self, chunk: int, x: torch.Tensor) -> torch.Tensor:
        """One chunk's layers. With one chunk the (wrapped) pruned GPT is exactly that."""
        if self.n_chunks == 1:
            return self.s.model(x)
        for layer in self.chunk_layers[chunk]:
            x = layer(x)
        return x

    # ------------------------------------------------------------------ point-to-point
    def _send(self, tensor: torch.Tensor, dst: int, step: int, mb: int, tag: int = 0) -> None:
        # isend, not send: with Gloo a send may wait until the peer posts its recv, and in 1F1B
        # neighbours send to each other at the same time (activation one way, gradient the other),
        # which would deadlock. The tensor must stay alive until the send completes.
        tensor = tensor.detach().to(ACTIVATION_DTYPE).contiguous()
        with self.s.timeline.span("send", step, mb):
            work = dist.isend(tensor, dst, tag=tag)
        self._pending.append((work, tensor))
        # Drop the sends that completed, so a long 1F1B step does not keep every activation
        # it ever sent alive until the end of the step.
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        self.s.sent("pp", tensor.numel() * tensor.element_size())

    def _recv(
        self, shape: tuple[int, ...], src: int, step: int, mb: int, tag: int = 0
    ) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=ACTIVATION_DTYPE, device=self.s.ctx.device)
        with self.s.timeline.span("recv", step, mb):  # includes waiting for the peer: the bubble
            dist.recv(buffer, src, tag=tag)
        return buffer

    def _wait_sends(self, step: int) -> None:
        if self._pending:
            with self.s.timeline.span("wait", step):
                for work, _ in self._pending:
                    work.wait()
        self._pending.clear()

    # ------------------------------------------------------------------ one step
    def forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], scale: float, step: int
    ) -> torch.Tensor:
        """Run each grad-accum chunk through the pipeline in ``cfg.micro_batches`` pieces.

        Every rank holds its replica's rows (a pure function of seed and step): the first stage
        reads the tokens, the last the targets, and all of them read the shapes. Each
        micro-batch's loss is its sum times ``scale``. Only the step's last backward
        synchronises gradients over dp; the others run under ``no_sync``. Returns this rank's
        summed token loss: the real sum on the last stage, zero elsewhere.
        """
        m = self.s.cfg.micro_batches
        total = torch.zeros((), device=self.s.ctx.device)
        for chunk, (x, y) in enumerate(micro_batches):
            pieces = split_micro_batches(x, y, m)
            last_chunk = chunk == len(micro_batches) - 1
            total += self.run_schedule(pieces, scale, step, chunk * m, last_chunk)
        self._wait_sends(step)
        return total

    def run_schedule(
        self,
        pieces: list[tuple[torch.Tensor, torch.Tensor]],
        scale: float,
        step: int,
        first_index: int = 0,
        sync_last: bool = True,
    ) -> torch.Tensor:
        """One pipeline flush: this stage's forwards and backwards in ``self.order`` order.

        Actions are ``(kind, micro_batch[, chunk])``; ``"W"`` (zero-bubble schedules) is the
        weight-gradient pass its ``"B"`` left in ``self.stash``.
        """
        # (micro-batch, chunk) -> (input, output)
        saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        total = torch.zeros((), device=self.s.ctx.device)
        actions = self.order(len(pieces))
        last_virtual = self.n_virtual - 1
        for k, (action, i, *rest) in enumerate(actions):
            chunk = rest[0] if rest else 0
            x, y = pieces[i]
            mb = first_index + i
            sync = sync_last and k == len(actions) - 1
            if action == "F":
                saved[i, chunk] = self._forward(x, y, step, mb, chunk)
                if self._virtual(chunk) == last_virtual:
                    total += saved[i, chunk][1].detach()
            elif action == "B":
                inp, out = saved.pop((i, chunk))  # popping frees this micro-batch's activations
                with nullcontext() if sync else self.s.no_sync():
                    self._backward(inp, out, scale, step, mb, chunk)
            else:
                assert self.stash is not None, "a W action needs pp_schedule='zb-h1'"
                with self.s.timeline.span("weight", step, mb):
                    self.stash.run((mb, chunk))
        return total

    def _activation_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        return (x.shape[0], x.shape[1], self.width)

    def _forward(
        self, x: torch.Tensor, y: torch.Tensor, step: int, mb: int, chunk: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one micro-batch through one chunk; returns (input, output or summed loss)."""
        vs = self._virtual(chunk)
        first, last = vs == 0, vs == self.n_virtual - 1
        if first:
            inp = x
        else:
            # A leaf that requires grad: after the backward, inp.grad is what we send back.
            shape = self._activation_shape(x)
            tag = self._tag(mb, vs, gradient=False)
            inp = self._recv(shape, self.prev_rank, step, mb, tag).requires_grad_()
        with self.s.timeline.span("forward", step, mb), self.s.autocast():
            out = self._run_chunk(chunk, inp)
            if last:
                out = lm_loss_sum(out, y)
        if not last:
            self._send(out, self.next_rank, step, mb, self._tag(mb, vs + 1, gradient=False))
        return inp, out

    def _backward(
        self,
        inp: torch.Tensor,
        out: torch.Tensor,
        scale: float,
        step: int,
        mb: int,
        chunk: int = 0,
    ) -> None:
        """Backward one micro-batch through one chunk; the loss is ``sum * scale`` like
        base.forward_backward. Under zb-h1 this is B only: weight gradients go to the stash."""
        vs = self._virtual(chunk)
        first, last = vs == 0, vs == self.n_virtual - 1
        grad = None
        if not last:
            tag = self._tag(mb, vs, gradient=True)
            grad = self._recv(tuple(out.shape), self.next_rank, step, mb, tag)
        if self.stash is not None:
            self.stash.begin((mb, chunk))
        with self.s.timeline.span("backward", step, mb):
            if last:
                self.s.backward(out * scale)
            elif out.requires_grad:  # False only if everything up to here is frozen
                torch.autograd.backward(out, grad)
        if self.stash is not None:
            self.stash.end()
        if not first:
            grad_in = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            self._send(grad_in, self.prev_rank, step, mb, self._tag(mb, vs - 1, gradient=True))

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Validation loss: each batch flows forward through the (virtual) stages in order; the
        last one scores it."""
        device = self.s.ctx.device
        total, tokens = 0.0, 0
        last = self.n_virtual - 1
        me = self.s.ctx.rank
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            local: torch.Tensor | None = None  # an output this rank hands to its own next chunk
            for chunk in range(self.n_chunks):
                vs = self._virtual(chunk)
                if vs == 0:
                    inp = x
                elif self._owner(vs - 1) == me:
                    inp, local = local, None
                else:
                    shape = self._activation_shape(x)
                    inp = torch.empty(shape, dtype=ACTIVATION_DTYPE, device=device)
                    dist.recv(inp, self._owner(vs - 1))
                with self.s.autocast():
                    out = self._run_chunk(chunk, inp)
                    if vs == last:
                        total += float(lm_loss_sum(out, y))
                if vs != last and self._owner(vs + 1) == me:
                    local = out.to(ACTIVATION_DTYPE)
                elif vs != last:
                    # One batch at a time along one path: the receiver is (or will be) waiting
                    # in its recv, so a blocking send cannot deadlock.
                    dist.send(out.to(ACTIVATION_DTYPE).contiguous(), self._owner(vs + 1))
            tokens += y.numel()
        value = torch.tensor([total], dtype=torch.float64, device=device)
        dist.broadcast(value, group=self.group, group_src=self.loss_stage)
        return float(value) / tokens

    def close(self) -> None:
        """Make sure no send is left in flight."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


# ---------------------------------------------------------------------------------------------
# 4. The same stages through torch.distributed.pipelining
# ---------------------------------------------------------------------------------------------


def _timed_stage(pipe: TorchPipeline, *args: Any, **kwargs: Any) -> Any:
    """torch's ``PipelineStage(*args, **kwargs)``, recording each forward and backward.

    The schedule drives the stage through ``forward_one_chunk`` / ``backward_one_chunk`` (and,
    for zero-bubble schedules, ``backward_weight_one_chunk``), one micro-batch each, so timing
    those calls gives the same events as the hand-written pipeline (send and recv are issued
    inside torch's schedule and are not recorded). torch.distributed.pipelining is imported
    here, not at the top of the file: the import takes about a second, which the hand-written
    pipelines need not pay.
    """
    from torch.distributed.pipelining import PipelineStage

    timeline = pipe.s.timeline

    class TimedStage(PipelineStage):
        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            mb = pipe.first_index + fwd_chunk_id
            with timeline.span("forward", pipe.current_step, mb):
                return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

        def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            mb = pipe.first_index + bwd_chunk_id
            with timeline.span("backward", pipe.current_step, mb):
                return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

        def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            mb = pipe.first_index + bwd_chunk_id
            with timeline.span("weight", pipe.current_step, mb):
                return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)

    return TimedStage(*args, **kwargs)


class TorchPipeline(Pipeline):
    """``pp_schedule="torch-..."``: our stages (or chunks), torch's schedule and p2p.

    ``torch-gpipe`` and ``torch-1f1b`` get one ``PipelineStage`` per rank; the interleaved
    twins (``torch-interleaved-1f1b``, ``torch-interleaved-zb``) one per chunk, virtual stage
    ``c * pp + rank`` as in the hand-written executor, so both cut the model identically;
    ``torch-zbv`` two per rank in a V (virtual stages ``rank`` and ``2 pp - 1 - rank``).
    torch's schedules need ``micro_batches >= pp`` here. The loss function is ours: the
    micro-batch's summed cross-entropy times the step's scale, and ``scale_grads=False`` so
    torch does not divide the gradients by the number of micro-batches again. Evaluation
    reuses the hand-written forward-only pass.
    """

    def start(self) -> None:
        """Wrap the (final) stage module, or each chunk, for torch and build the schedule."""
        from torch.distributed import pipelining

        from labkit.parallel.presets import PP_SCHEDULES

        super().start()
        s, cfg, m = self.s, self.s.cfg, self.s.cfg.micro_batches
        schedule_cls = getattr(pipelining, PP_SCHEDULES[cfg.pp_schedule].torch_class)
        rows = cfg.global_batch_size // cfg.dp // cfg.grad_accum_steps // m
        t, dev = s.module.cfg.block_size, s.ctx.device
        # Example tensors of one micro-batch put torch's stage in its static mode: no shape
        # inference at the first step. They require grad where the real ones do (activations),
        # which tells torch that gradients flow back through them.
        act = torch.zeros(rows, t, self.width, dtype=ACTIVATION_DTYPE, device=dev)
        act.requires_grad_()
        tokens = torch.zeros(rows, t, dtype=torch.long, device=dev)
        logits = torch.zeros(rows, t, s.module.cfg.vocab_size, device=dev, requires_grad=True)
        self.current_step, self.first_index = 0, 0
        self._loss_sums: list[torch.Tensor] = []
        self._scale = 1.0
        if self.n_chunks == 1:
            modules, indices = [s.model], [self.stage]
        else:  # a chunk is its layers in order; Sequential only groups them (same parameters)
            modules = [nn.Sequential(*layers) for layers in self.chunk_layers]
            indices = [self._virtual(c) for c in range(self.n_chunks)]
        last = self.n_virtual - 1
        stages = [
            _timed_stage(
                self,
                module,
                index,
                self.n_virtual,
                dev,
                input_args=tokens if index == 0 else act,
                output_args=logits if index == last else act,
                group=self.group,
            )
            for module, index in zip(modules, indices, strict=True)
        ]
        multi = issubclass(schedule_cls, pipelining.schedules.PipelineScheduleMulti)
        self.schedule = schedule_cls(
            stages if multi else stages[0],
            n_microbatches=m,
            loss_fn=self._loss_fn,
            scale_grads=False,
        )

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss_sum = lm_loss_sum(logits, targets)
        self._loss_sums.append(loss_sum.detach())
        return loss_sum * self._scale

    def forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], scale: float, step: int
    ) -> torch.Tensor:
        """One ``schedule.step`` per grad-accum chunk; torch splits it into micro-batches."""
        self.current_step, self._scale = step, scale
        self._loss_sums.clear()
        for chunk, (x, y) in enumerate(micro_batches):
            self.first_index = chunk * self.s.cfg.micro_batches
            args = (x,) if self.holds_input else ()
            with self.s.autocast():
                self.schedule.step(*args, target=y if self.holds_loss else None)
        total = torch.zeros((), device=self.s.ctx.device)
        for loss_sum in self._loss_sums:
            total += loss_sum
        return total


def make_pipeline(strategy: Any, model: GPT) -> Pipeline:
    """This rank's stage of ``model`` (pruned in place) run by ``cfg.pp_schedule``."""
    cls = TorchPipeline if strategy.cfg.pp_schedule.startswith("torch-") else Pipeline
    return cls(strategy, model)
