"""The one training loop. Every strategy, from a single process to a pipeline, runs through it.

One optimizer step, in order:

1. take this rank's rows of the global batch for this step (a pure function of seed and step),
2. forward and backward over the micro-batches (the strategy: accumulation, pipelining, sharding),
3. finish the gradient synchronisation (the strategy),
4. unscale (fp16 only), then clip by the *global* norm over every shard and stage,
5. skip the step if that norm is not finite (counted), or raise, as configured,
6. optimizer step, scheduler step (once per optimizer step, never per micro-batch),
7. record metrics, evaluate, checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from labkit import checkpoint as ckpt
from labkit.clip import make_clipper
from labkit.config import TrainConfig
from labkit.data import (
    global_batch,
    load_corpus,
    model_vocab_size,
    split_micro_batches,
    validation_batches,
)
from labkit.model import GPT, build_gpt, count_params, flops_per_token, model_config
from labkit.parallel import make_strategy
from labkit.parallel.base import DistContext, Strategy
from labkit.timeline import COMM_PHASES

# Validation batches hold this many sequences whatever the training batch, so runs with different
# batch sizes are measured on the same held-out text (cfg.eval_batches of them).
VAL_BATCH_SIZE = 16
# Steps at the start of a run whose memory is measured (saved-tensor hooks cost a little).
MEASURED_STEPS = 2


@dataclass
class RankOutput:
    """What one rank hands back: its metric rows, its timeline, facts about the run."""

    metrics: list[dict[str, Any]]
    timeline: list[tuple[int, int, int, str, float, float]]
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None
    layer_norms: list[tuple[int, int, str, float]] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # this rank's measured bytes
    trace_file: str | None = None  # this rank's profiler trace (TrainConfig.profile)
    # (rank, step, phase, start_s, end_s, payload_bytes) of each collective the profiler saw
    collectives: list[tuple[int, int, str, float, float, int]] = field(default_factory=list)


def build_model(cfg: TrainConfig) -> GPT:
    """The GPT this config trains, initialised from ``cfg.seed``, with ``cfg.freeze`` applied."""
    vocab = model_vocab_size(cfg.corpus, cfg.vocab_size)
    mcfg = model_config(cfg.model, vocab_size=vocab, norm=cfg.norm, block_size=cfg.block_size)
    model = build_gpt(mcfg, cfg.seed)
    for block in model.blocks:
        block.recompute = cfg.recompute
        if cfg.compile_backend is not None:
            # In place and lazily (traced at the first call): the parameter names stay the GPT's,
            # and the parallel wrappers, pipeline chunks and tp layers set up later are what is
            # traced. Ring attention's and tp's collectives are graph breaks.
            block.compile(backend=cfg.compile_backend)
    names = [n for n, _ in model.named_parameters()]
    for prefix in cfg.freeze:
        matched = [n for n in names if n.startswith(prefix)]
        if not matched:
            raise ValueError(f"TrainConfig.freeze: {prefix!r} matches no parameter of the model")
        for name in matched:
            model.get_parameter(name).requires_grad_(False)
    return model


def _compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far; a run reports how many it
    added (``info["compiled_graphs"]``, 0 with compile off): evidence that compile took effect."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def _inject_fault(cfg: TrainConfig, rank: int, step: int) -> None:
    """Fail on purpose when ``cfg.fault`` says so (the fault-tolerance lesson and its tests)."""
    if cfg.fault is None:
        return
    kind, fault_rank, fault_step = cfg.fault.split(":")
    if kind != "overflow" and rank == int(fault_rank) and step == int(fault_step):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")


def _inject_overflow(cfg: TrainConfig, step: int, params: list[torch.Tensor]) -> None:
    """``fault="overflow:0:STEP"``: every rank's gradients become infinite at STEP (after the
    sync, so all ranks agree), the way an fp16 overflow shows up."""
    if cfg.fault and cfg.fault.startswith("overflow:") and step == int(cfg.fault.split(":")[2]):
        for p in params:
            if p.grad is not None:
                p.grad.fill_(math.inf)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Holds the pieces of a run on one rank and steps them; ``train`` is the usual entry."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, t0: float | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self._graphs_before = _compiled_graphs()  # the counter is per process, not per run
        self.corpus = load_corpus(cfg.corpus)
        model = build_model(cfg)
        self.model_cfg = model.cfg
        self.n_params = count_params(model)
        self.strategy: Strategy = make_strategy(cfg, ctx, model)
        if t0 is not None:
            self.strategy.timeline.t0 = t0
        if cfg.precision == "fp16":
            self.strategy.scaler = torch.amp.GradScaler(ctx.device.type)
        self.optimizer = self.strategy.make_optimizer()
        self.schedule = cfg.lr_schedule()
        self.scheduler = self.schedule.as_scheduler(self.optimizer)
        self.clipper = make_clipper(
            cfg.clip,
            max_norm=cfg.max_norm,
            clip_value=cfg.clip_value,
            agc_clip_factor=cfg.agc_clip_factor,
            autoclip_percentile=cfg.autoclip_percentile,
            zclip_z=cfg.zclip_z,
            zclip_alpha=cfg.zclip_alpha,
            zclip_warmup_steps=cfg.zclip_warmup_steps,
        )
        self.val = validation_batches(
            self.corpus,
            seed=cfg.seed,
            n_batches=cfg.eval_batches,
            batch_size=VAL_BATCH_SIZE,
            block_size=self.model_cfg.block_size,
        )
        self.step = 0
        self._measured = 0  # steps whose memory was measured
        self.skipped = 0
        self.run_id: str | None = None  # identity of this run's checkpoints (rank 0 sets it)
        self.metrics: list[dict[str, Any]] = []
        self.layer_norms: list[tuple[int, int, str, float]] = []
        # perf_counter intervals of evaluations: their collectives are not part of a step.
        self.eval_spans: list[tuple[float, float]] = []
        self.step_starts: list[tuple[float, int]] = []  # (perf_counter, step) of every step
        self.flops_per_token = flops_per_token(self.model_cfg)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Every rank writes its file atomically; rank 0 then points latest.json at them."""
        root = self.cfg.checkpoint_dir
        state = {
            "step": self.step,
            "model": self.strategy.local_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "clipper": self.clipper.state_dict(),
            "scaler": self.strategy.scaler.state_dict() if self.strategy.scaler else None,
            "rng": _rng_state(),
            "skipped": self.skipped,
            "metrics": self.metrics,
            "layer_norms": self.layer_norms,
        }
        ckpt.save_atomic(state, ckpt.rank_file(root, self.step, self.ctx.rank))
        self.ctx.barrier()  # every rank's file is on disk before meta.json marks it complete
        if self.ctx.rank == 0:
            if self.run_id is None:
                self.run_id = ckpt.new_run_id()
            ckpt.write_latest(root, self.step, self.cfg.to_dict(), self.run_id)
        self.ctx.barrier()

    def _resume_point(self) -> tuple[int | None, str | None]:
        """(step, run_id) to resume from, decided by rank 0 and shared with every rank."""
        choice: list[Any] = [None, None]
        if self.ctx.rank == 0:
            root = self.cfg.checkpoint_dir
            newest = ckpt.check_compatible(root, self.cfg.to_dict())
            if newest is not None:
                step = ckpt.loadable_step(root, self.ctx.world_size, newest)
                if step is None:
                    raise ckpt.CheckpointError(
                        f"TrainConfig.resume: no checkpoint in {root} can be loaded (see the "
                        "warnings); resume=False with overwrite=True starts a fresh run there"
                    )
                meta = ckpt.read_latest(root) or {}
                choice = [step, meta.get("run_id")]
        if self.ctx.distributed:
            dist.broadcast_object_list(choice, src=0)
        return choice[0], choice[1]

    def load_checkpoint(self) -> bool:
        """Resume from ``cfg.checkpoint_dir`` if it holds a checkpoint; True if one was loaded."""
        step, self.run_id = self._resume_point()
        if step is None:
            return False
        state = ckpt.load_rank(self.cfg.checkpoint_dir, step, self.ctx.rank)
        self.strategy.load_local_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.clipper.load_state_dict(state["clipper"])
        if state["scaler"] is not None and self.strategy.scaler is not None:
            self.strategy.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step, self.skipped, self.metrics = step, state["skipped"], state["metrics"]
        self.layer_norms = list(state.get("layer_norms", []))  # older checkpoints lack them
        return True

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns this rank's metrics row."""
        cfg, s, step = self.cfg, self.strategy, self.step
        _inject_fault(cfg, self.ctx.rank, step)
        t_start = time.perf_counter()
        self.step_starts.append((t_start, step))
        s.bytes_sent = dict.fromkeys(s.bytes_sent, 0)
        x, y = global_batch(
            self.corpus.train,
            seed=cfg.seed,
            step=step,
            batch_size=cfg.global_batch_size,
            block_size=self.model_cfg.block_size,
        )
        n_tokens = y.numel()
        x, y = s.local_batch(x, y)
        x, y = x.to(s.ctx.device), y.to(s.ctx.device)
        micro = split_micro_batches(x, y, cfg.grad_accum_steps)

        # Memory is measured on the first steps of a run (every step has the same shapes), so
        # the hooks cost nothing afterwards. Step 1 is the first with optimizer state.
        measure = self._measured < MEASURED_STEPS
        with s.activation_meter if measure else contextlib.nullcontext():
            local_loss = s.forward_backward(micro, n_tokens, step)
        s.finish_grad_sync(step)
        _inject_overflow(cfg, step, s.trainable_parameters())

        with s.timeline.span("optimizer", step):
            if s.scaler is not None:
                s.scaler.unscale_(self.optimizer)
            if cfg.layer_norms:
                for name, value in s.layer_grad_norms().items():
                    self.layer_norms.append((step, self.ctx.rank, name, value))
            norm = float(s.clip_gradients(self.clipper))
            clipped = float(s.grad_norm())
            if measure:  # gradients and optimizer state both exist right before the step
                s.note_state_bytes(self.optimizer)
                self._measured += 1
            lr = self.optimizer.param_groups[0]["lr"]
            finite = math.isfinite(norm)
            if not finite and cfg.nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite gradient norm {norm} at step {step} (TrainConfig.nonfinite='raise')"
                )
            if s.scaler is not None:
                s.scaler.step(self.optimizer)  # skips by itself on inf/nan
                s.scaler.update()
            elif finite:
                self.optimizer.step()
            self.skipped += 0 if finite else 1
            self.optimizer.zero_grad(set_to_none=True)
            # The schedule advances once per optimizer step, skipped or not: the LR is a function
            # of the step index, identical on every rank.
            self.scheduler.step()

        loss = s.reduce_loss(local_loss) / n_tokens
        step_time = time.perf_counter() - t_start
        compute_s, comm_s = s.timeline.durations(step, s.nested_comm)
        local_tokens = sum(m[1].numel() for m in micro)
        self.step += 1
        return {
            "step": step,
            "rank": self.ctx.rank,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "grad_norm_clipped": clipped,
            "skipped": not finite,
            "step_time_s": step_time,
            "tokens_per_s": local_tokens / step_time,
            "global_tokens_per_s": n_tokens / step_time,
            "flops_per_s": self.flops_per_token * local_tokens / step_time,
            "compute_s": compute_s,
            "comm_s": comm_s,
            "comm_bytes": s.comm_bytes,
            # fp16: the GradScaler's scale after this step (it halves on an overflow).
            "loss_scale": s.scaler.get_scale() if s.scaler is not None else float("nan"),
            **{f"comm_bytes_{dim}": n for dim, n in s.bytes_sent.items()},
            "val_loss": float("nan"),
        }

    def fit(self, on_step: Callable[[int], None] | None = None) -> RankOutput:
        """Train from the current step to ``cfg.steps`` (or ``cfg.stop_after``)."""
        cfg = self.cfg
        if cfg.resume:
            self.load_checkpoint()
        end = cfg.stop_after if cfg.stop_after is not None else cfg.steps
        profiler = self._profiler() if cfg.profile else contextlib.nullcontext()
        with profiler:
            self._loop(end, on_step)
        trace_file, collectives = self._use_profiled_comm(profiler) if cfg.profile else (None, [])
        info = {
            "n_params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "skipped_steps": self.skipped,
            "device": str(self.ctx.device),
            "backend": self.ctx.backend,
            "world_size": self.ctx.world_size,
            "threads": torch.get_num_threads(),
            "compiled_graphs": _compiled_graphs() - self._graphs_before,
        }
        memory = {"rank": self.ctx.rank, **self.strategy.memory_stats()}
        state = self.strategy.full_state_dict()
        self.strategy.close()
        timeline = list(self.strategy.timeline.rows)
        return RankOutput(
            self.metrics, timeline, info, state, self.layer_norms, memory, trace_file, collectives
        )

    def _loop(self, end: int, on_step: Callable[[int], None] | None) -> None:
        """Steps, evaluations and checkpoints up to step ``end``."""
        cfg = self.cfg
        while self.step < end:
            row = self.train_step()
            last = self.step == cfg.steps
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                start = time.perf_counter()
                row["val_loss"] = self.strategy.evaluate(self.val)
                self.eval_spans.append((start, time.perf_counter()))
            self.metrics.append(row)
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == end):
                self.save_checkpoint()
            if on_step is not None:
                on_step(self.step)

    def _profiler(self) -> Any:
        """This rank's profiler; rank 0 picks the directory and tells the others."""
        from labkit.profiling import RankProfiler

        where = [self.cfg.trace_dir]
        if self.ctx.rank == 0 and where[0] is None:
            where[0] = tempfile.mkdtemp(prefix="labkit-trace-")
        if self.ctx.distributed:
            dist.broadcast_object_list(where, src=0)
        path = Path(where[0]) / f"rank{self.ctx.rank}.json"
        return RankProfiler(path, cuda=self.ctx.device.type == "cuda")

    def _use_profiled_comm(self, profiler: Any) -> tuple[str | None, list[tuple]]:
        """Replace the timeline's communication spans by the collectives the profiler saw.

        Each collective belongs to the last step that started before it (a pipeline stage's
        first receive comes before its first forward, but after its step began). Those that ran during an evaluation (after the step) stay off the timeline, so a step's
        communication is only its own. Returns the trace file and the collectives with their
        measured payload bytes and when they ran (``"train"`` or ``"eval"``).
        """
        tl = self.strategy.timeline
        starts = sorted(self.step_starts)
        tl.rows = [row for row in tl.rows if row[3] not in COMM_PHASES]
        collectives = []
        for phase, start, end, nbytes in profiler.spans:
            rel = start - tl.t0
            step = max((s for t, s in starts if t <= start), default=starts[0][1] if starts else 0)
            during = "eval" if any(a <= start <= b for a, b in self.eval_spans) else "train"
            if during == "train":
                tl.add(phase, step, -1, rel, end - tl.t0)
            collectives.append((self.ctx.rank, step, phase, rel, end - tl.t0, nbytes, during))
        return profiler.trace_file, collectives


def train(
    cfg: TrainConfig,
    ctx: DistContext | None = None,
    on_step: Callable[[int], None] | None = None,
    t0: float | None = None,
) -> RankOutput:
    """Train on this rank (all ranks call it together in a multi-process run)."""
    return Trainer(cfg, ctx or DistContext(), t0=t0).fit(on_step)


def shared_clock(ctx: DistContext) -> float:
    """Rank 0's ``perf_counter`` at start-up, broadcast so all timelines share one origin."""
    t0 = torch.tensor([time.perf_counter()], dtype=torch.float64)
    if ctx.distributed:
        t0 = t0.to(ctx.device) if ctx.backend == "nccl" else t0
        dist.broadcast(t0, src=0)
    return float(t0.cpu())
