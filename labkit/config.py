"""TrainConfig: every knob of a labkit run, validated before any process starts.

A config is plain data (a dataclass) so it pickles to worker processes, prints in a notebook and
maps one-to-one onto the command line flags of ``labkit train``. ``__post_init__`` validates every
field and raises ``ValueError`` naming the field, the value and what is allowed: a typo must fail
in the notebook cell, not three minutes later inside rank 1. A config is frozen: change one with
``cfg.replace(steps=10)`` (validated again), never by assignment, so a validated config stays valid.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

from labkit.clip import CLIP_METHODS  # the clipping module owns its list of methods
from labkit.parallel import presets as P

# The names users type. Kept here (not in the modules that implement them) so validation needs no
# heavy imports and the lists are in one place.
MODELS = ("nano", "micro", "small", "medium", "large", "xl")
CORPORA = ("pydoc", "synthetic")
NORMS = ("pre", "post")
OPTIMIZERS = ("adamw", "adam", "sgd")
NONFINITE = ("skip", "raise")
PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE = ("none", "full", "selective")
# torch.compile backends TrainConfig.compile may name (True means "inductor", torch's default).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# Strategy names, data-parallel flavours and pipeline schedules: one table, in parallel.presets.
STRATEGIES = P.STRATEGIES
DP_IMPLS = tuple(P.DP_IMPLS)
PP_SCHEDULES = tuple(P.PP_SCHEDULES)
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
PP_BALANCE = ("layers", "params")
FAULTS = ("raise", "kill", "overflow")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"TrainConfig.{name}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `steps=True` is a mistake, not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# Fields that may be derived from others (see TrainConfig._resolve_mesh and replace).
DERIVED_FIELDS = ("strategy", "world_size", "dp", "pp", "cp", "tp", "dp_impl", "pp_schedule")
# How the data-parallel flavours that take part in context parallelism average over dp x cp.
CP_DP_IMPLS = ("naive", "bucketed", "ddp")
# Largest seed: torch.manual_seed takes a 64-bit value; stay in the signed range every RNG accepts.
MAX_SEED = 2**63 - 1
# Keyword arguments of get_schedule that a TrainConfig field already sets (see schedule_args).
SCHEDULE_FIELDS = {
    "peak_lr": "lr",
    "total_steps": "steps",
    "warmup_steps": "warmup_steps",
    "warmup": "warmup",
    "min_lr": "min_lr",
    "beta2": "beta2",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Construct with keywords; invalid values raise ValueError.

    The equivalence invariant: for the same ``seed`` and ``global_batch_size`` every strategy
    trains on the same batches and produces the same parameters as ``strategy="single"``.
    """

    # What to train on.
    model: str = "small"
    norm: str = "pre"
    block_size: int | None = None
    # Rows of the embedding and the output head: None takes the corpus's characters; a larger
    # number (50304, GPT-2's padded tokenizer) sizes the head like a real tokenizer's, so FLOPs
    # and memory are those of a real LM (the corpus still uses only its characters' ids).
    vocab_size: int | None = None
    corpus: str = "pydoc"
    # How long and how much per optimizer step.
    steps: int = 100
    global_batch_size: int = 16
    grad_accum_steps: int = 1
    micro_batches: int = 1
    seed: int = 0
    # Optimizer.
    optimizer: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    # Learning-rate schedule and warm-up (see labkit.schedules).
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup: str = "linear"
    min_lr: float = 0.0
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    # Gradient clipping (see labkit.clip) and what to do with non-finite gradients.
    clip: str = "norm"
    max_norm: float = 1.0
    clip_value: float = 1.0
    agc_clip_factor: float = 0.01
    autoclip_percentile: float = 10.0
    zclip_z: float = 2.5
    zclip_alpha: float = 0.97
    zclip_warmup_steps: int = 25
    nonfinite: str = "skip"
    precision: str = "fp32"
    # Activation recomputation per transformer block: keep nothing inside a block and recompute
    # it in backward ("full"), or recompute only attention ("selective").
    recompute: str = "none"
    # torch.compile each transformer block (torchtitan's per-block compile): False (off), True
    # (the default inductor backend, fused kernels; needs a C++ compiler on CPU), or a backend
    # name: "aot_eager" traces forward and backward without generating code, "eager" only traces.
    compile: bool | str = False
    # Parallelism.
    # A preset name (labkit.parallel.presets), or None: "single", or "mesh" when dp/pp/cp/tp are set.
    strategy: str | None = None
    # The mesh: dp x pp x cp x tp = world_size. Unset (None) values come from the preset: its
    # dimension takes every rank the others leave, the rest are 1. Always ints once constructed.
    # cp (context parallelism) gives each of its ranks a zig-zag piece of every sequence and runs
    # attention as ring attention (labkit.parallel.context_parallel).
    world_size: int | None = None
    dp: int | None = None
    pp: int | None = None
    tp: int | None = None
    cp: int | None = None
    dp_impl: str | None = None  # how dp is done: naive, bucketed, ddp, zero1, zero2, zero3, fsdp
    pp_schedule: str | None = None  # gpipe, 1f1b, interleaved-1f1b, zb-h1, torch-... (presets)
    # Chunks of layers per pipeline rank (virtual stages); > 1 with interleaved-1f1b only.
    pp_virtual_stages: int = 1
    backend: str = "auto"
    device: str = "auto"
    bucket_mb: float = 25.0
    pp_balance: str = "layers"
    threads: int | None = None
    timeout_s: float = 60.0
    freeze: tuple[str, ...] = ()
    # Evaluation, checkpoints, output.
    eval_every: int = 20
    eval_batches: int = 4
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False  # replace another run's checkpoints in checkpoint_dir (not resuming)
    stop_after: int | None = None
    progress: bool = True
    timeline: bool = True
    # Record every step with torch.profiler: one trace per rank (RunResult.trace_files, opens in
    # Perfetto), and the timeline's communication spans taken from what the backend ran.
    profile: bool = False
    trace_dir: str | None = None  # where traces go (default: a new temporary directory)
    layer_norms: bool = False  # record every parameter's pre-clip gradient norm each step
    # Fault injection for the fault-tolerance lesson and tests: "raise:RANK:STEP" or
    # "kill:RANK:STEP" stop a rank; "overflow:0:STEP" makes every rank's gradients infinite at
    # STEP after the sync, as an fp16 overflow would (the step is then skipped and counted).
    fault: str | None = None
    # A seeded bug of the bug zoo (labkit.bugs.BUGS: "A" ... "D"), for the detective lesson;
    # None (the default) runs labkit as it should.
    bug: str | None = None

    def __post_init__(self) -> None:
        # Normalise a few convenient spellings (frozen: object.__setattr__ is the only way in).
        freeze = self.freeze
        if isinstance(freeze, str):
            freeze = (freeze,) if freeze else ()
        if not isinstance(freeze, (tuple, list)):
            _fail("freeze", freeze, "must be a tuple of parameter-name prefixes")
        object.__setattr__(self, "freeze", tuple(freeze))
        if not isinstance(self.schedule_kwargs, dict) and self.schedule_kwargs is not None:
            _fail("schedule_kwargs", self.schedule_kwargs, "must be a dict of keyword arguments")
        object.__setattr__(self, "schedule_kwargs", dict(self.schedule_kwargs or {}))
        if isinstance(self.checkpoint_dir, os.PathLike):
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        self._resolve_mesh()
        self.validate()

    def _resolve_mesh(self) -> None:
        """Fill strategy, world_size, dp, pp, cp, tp, dp_impl and pp_schedule from what was set."""
        for name in ("world_size", *P.DIMS):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _fail(name, value, "must be an integer >= 1")
        dims = {d: getattr(self, d) for d in P.DIMS}
        strategy = self.strategy
        if strategy is None:
            if any(v not in (None, 1) for v in dims.values()):
                strategy = "mesh"
            elif (self.world_size or 1) > 1:
                _fail(
                    "world_size",
                    self.world_size,
                    "a run of several processes needs a strategy (one of "
                    + ", ".join(repr(s) for s in STRATEGIES[1:])
                    + ") or the mesh fields dp, pp, cp, tp",
                )
            else:
                strategy = "single"
        if strategy not in STRATEGIES:
            _fail("strategy", strategy, "allowed: " + ", ".join(repr(a) for a in STRATEGIES))
        world, mesh = P.resolve_mesh(strategy, self.world_size, dims)
        preset = P.PRESETS[strategy]
        for name, fixed, default, allowed in (
            ("dp_impl", preset.dp_impl, P.DEFAULT_DP_IMPL, DP_IMPLS),
            ("pp_schedule", preset.pp_schedule, P.DEFAULT_PP_SCHEDULE, PP_SCHEDULES),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                _fail(name, value, "allowed: " + ", ".join(repr(a) for a in allowed))
            if fixed is not None and value not in (None, fixed):
                _fail(
                    name,
                    value,
                    f"strategy={strategy!r} means {name}={fixed!r}; use strategy='mesh' "
                    f"(or another preset) to choose {name}",
                )
            object.__setattr__(self, name, value or fixed or default)
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "world_size", world)
        for d, v in mesh.items():
            object.__setattr__(self, d, v)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field; called on construction."""
        self._check_choice("model", MODELS)
        self._check_choice("norm", NORMS)
        self._check_choice("corpus", CORPORA)
        self._check_choice("optimizer", OPTIMIZERS)
        self._check_choice("clip", CLIP_METHODS)
        self._check_choice("nonfinite", NONFINITE)
        self._check_choice("precision", PRECISIONS)
        self._check_choice("recompute", RECOMPUTE)
        self._check_choice("backend", BACKENDS)
        self._check_choice("device", DEVICES)
        self._check_choice("pp_balance", PP_BALANCE)

        for name in (
            "steps",
            "global_batch_size",
            "grad_accum_steps",
            "micro_batches",
            "pp_virtual_stages",
        ):
            self._check_int(name, minimum=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            self._check_int(name, minimum=0)
        if self.seed > MAX_SEED:
            _fail("seed", self.seed, f"must be at most 2**63 - 1 = {MAX_SEED}")
        self._check_int("eval_batches", minimum=1)
        self._check_int("zclip_warmup_steps", minimum=1)
        if self.block_size is not None:
            self._check_int("block_size", minimum=2)
        if self.vocab_size is not None:
            self._check_int("vocab_size", minimum=2)
        if self.threads is not None:
            self._check_int("threads", minimum=1)
        if self.stop_after is not None:
            self._check_int("stop_after", minimum=1)
            if self.stop_after > self.steps:
                _fail("stop_after", self.stop_after, f"must be at most steps={self.steps}")

        for name in ("lr", "eps", "max_norm", "clip_value", "agc_clip_factor", "timeout_s"):
            self._check_positive(name)
        for name in ("weight_decay", "momentum", "min_lr"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                _fail(name, value, "must be a number in [0, 1)")
        if not _is_number(self.bucket_mb) or self.bucket_mb <= 0:
            _fail("bucket_mb", self.bucket_mb, "must be a number of megabytes > 0")
        if not _is_number(self.autoclip_percentile) or not 0 < self.autoclip_percentile <= 100:
            _fail("autoclip_percentile", self.autoclip_percentile, "must be in (0, 100]")
        self._check_positive("zclip_z")
        if not _is_number(self.zclip_alpha) or not 0 < self.zclip_alpha < 1:
            _fail("zclip_alpha", self.zclip_alpha, "must be in (0, 1)")
        if self.min_lr > self.lr:
            _fail("min_lr", self.min_lr, f"must not exceed lr={self.lr}")
        if self.warmup_steps > self.steps:
            _fail("warmup_steps", self.warmup_steps, f"must be at most steps={self.steps}")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_BACKENDS:
            _fail(
                "compile",
                self.compile,
                "must be False, True (inductor) or a backend name: "
                + ", ".join(repr(b) for b in COMPILE_BACKENDS),
            )
        for name in ("resume", "overwrite", "progress", "timeline", "layer_norms", "profile"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        if self.checkpoint_dir is not None and (
            not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir.strip()
        ):
            _fail("checkpoint_dir", self.checkpoint_dir, "must be a directory path (a string)")
        if self.trace_dir is not None and (
            not isinstance(self.trace_dir, str) or not self.trace_dir.strip()
        ):
            _fail("trace_dir", self.trace_dir, "must be a directory path (a string)")
        if self.resume and not self.checkpoint_dir:
            _fail("resume", self.resume, "needs checkpoint_dir to resume from")
        if self.resume and self.overwrite:
            _fail("overwrite", self.overwrite, "cannot be combined with resume=True")
        if self.checkpoint_every and not self.checkpoint_dir:
            _fail("checkpoint_every", self.checkpoint_every, "needs checkpoint_dir to write to")
        if not all(isinstance(f, str) and f for f in self.freeze):
            _fail("freeze", self.freeze, "must be parameter-name prefixes (non-empty strings)")
        self._validate_fault()
        self._validate_bug()
        self._validate_parallel()
        self._validate_schedule()

    def _check_pipeline_schedule(self, n_layer: int) -> None:
        """What the hand-written interleaved and zero-bubble executors support (pp > 1)."""
        pp, v, sched = self.pp, self.pp_virtual_stages, self.pp_schedule
        if sched in P.CHUNKED_SCHEDULES:
            if v < 2:
                _fail("pp_virtual_stages", v, f"{sched} needs at least 2 chunks per rank")
            if sched == "torch-zbv" and v != 2:
                _fail("pp_virtual_stages", v, "torch-zbv places exactly 2 chunks per rank (a V)")
            if pp * v > n_layer + 2:
                _fail(
                    "pp_virtual_stages",
                    v,
                    f"pp*pp_virtual_stages={pp * v} chunks need as many layers: model "
                    f"{self.model!r} has {n_layer + 2} (embedding, {n_layer} blocks, head)",
                )
            if self.micro_batches % pp:
                _fail(
                    "micro_batches",
                    self.micro_batches,
                    f"{sched} runs micro-batches in groups of pp={pp}: use a multiple",
                )
            if self.dp > 1 and self.dp_impl not in ("naive", "bucketed", "zero1"):
                _fail(
                    "dp_impl",
                    self.dp_impl,
                    "interleaved-1f1b runs its chunks layer by layer, past the module's own "
                    "forward; with dp > 1 use 'naive', 'bucketed' or 'zero1'",
                )
        if sched == "zb-h1":
            for name, allowed in (("dp", 1), ("tp", 1)):
                if getattr(self, name) != allowed:
                    _fail(
                        self._mesh_field(name),
                        getattr(self, self._mesh_field(name)),
                        f"zb-h1's split backward runs with pp only here (dp=1, tp=1); got {name}="
                        f"{getattr(self, name)}",
                    )
            if self.precision != "fp32":
                _fail(
                    "precision",
                    self.precision,
                    "zb-h1's weight-gradient pass computes in float32: use precision='fp32'",
                )

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            _fail(name, value, "allowed: " + ", ".join(repr(a) for a in allowed))

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            _fail(name, value, f"must be an integer >= {minimum}")

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or value <= 0:
            _fail(name, value, "must be a finite number > 0")

    def _validate_bug(self) -> None:
        """A seeded bug must name one of the zoo, on a mesh where it can show."""
        if self.bug is None:
            return
        from labkit.bugs import BUGS

        if self.bug not in BUGS:
            _fail("bug", self.bug, f"allowed: {', '.join(BUGS)} (labkit.bugs), or None")
        needs = BUGS[self.bug].needs
        if needs == "pp" and self.pp < 2:
            _fail("bug", self.bug, "this bug lives in the pipeline: set pp >= 2")
        if needs == "tp" and self.tp < 2:
            _fail("bug", self.bug, "this bug lives in tensor parallelism: set tp >= 2")
        if needs == "ddp-accum" and (self.dp_impl != "ddp" or self.grad_accum_steps < 2):
            _fail(
                "bug",
                self.bug,
                "this bug lives in DDP's gradient accumulation: set dp >= 2, dp_impl='ddp' "
                "and grad_accum_steps >= 2",
            )

    def _validate_fault(self) -> None:
        if self.fault is None:
            return
        parts = str(self.fault).split(":")
        ok = len(parts) == 3 and parts[0] in FAULTS and parts[1].isdigit() and parts[2].isdigit()
        if not ok:
            _fail(
                "fault", self.fault, "use 'raise:RANK:STEP', 'kill:RANK:STEP' or 'overflow:0:STEP'"
            )
        if int(parts[1]) >= self.world_size:
            _fail("fault", self.fault, f"rank must be below world_size={self.world_size}")

    def _validate_parallel(self) -> None:
        dp, pp, tp = self.dp, self.pp, self.tp
        if self.backend == "nccl" and self.device == "cpu":
            _fail("backend", self.backend, "NCCL needs device='cuda' (use 'gloo' on CPU)")
        if self.device == "cuda" or self.backend == "nccl":
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0:
                _fail("device", self.device, "CUDA was requested but no GPU is visible")
        impl, sched = self.dp_impl, self.pp_schedule
        if self.precision == "fp16" and (
            pp > 1 or tp > 1 or (dp > 1 and impl not in ("naive", "bucketed", "ddp"))
        ):
            _fail(
                "precision",
                "fp16",
                "loss scaling is supported with one process and dp_impl naive, bucketed or ddp "
                "(no pp, no tp) only",
            )
        need = dp * self.grad_accum_steps
        if self.global_batch_size < need:
            _fail(
                "global_batch_size",
                self.global_batch_size,
                f"must be at least dp*grad_accum_steps={need} so every micro-batch "
                "holds at least one sequence",
            )
        from labkit.model import PRESETS

        preset = PRESETS[self.model]
        if pp > 1:
            if pp > preset.n_layer + 2:
                name = self._mesh_field("pp")
                _fail(
                    name,
                    getattr(self, name),
                    f"a pipeline needs at most one stage per layer: model {self.model!r} has "
                    f"{preset.n_layer} blocks plus embedding and head, so at most {preset.n_layer + 2}",
                )
            rows = dp * self.grad_accum_steps * self.micro_batches
            if self.global_batch_size % rows:
                # Name micro_batches only if it is what breaks the split.
                name = "micro_batches" if self.micro_batches > 1 else "global_batch_size"
                _fail(
                    name,
                    getattr(self, name),
                    f"dp*grad_accum_steps*micro_batches={rows} must divide "
                    f"global_batch_size={self.global_batch_size} (equal micro-batches per stage)",
                )
            if impl == "ddp" and dp > 1:
                _fail(
                    "dp_impl",
                    impl,
                    "DDP starts its gradient sync at the last micro-batch's forward, which a "
                    "pipeline schedule runs before earlier backwards; use 'bucketed' (the same "
                    "algorithm by hand) or another dp_impl with pp > 1",
                )
            self._check_pipeline_schedule(preset.n_layer)
            if sched.startswith("torch-"):
                _check_torch_schedule(sched)
                if self.micro_batches < pp:
                    _fail(
                        "micro_batches",
                        self.micro_batches,
                        f"pp_schedule={sched!r} (torch's schedule) needs at least pp={pp} "
                        "micro-batches",
                    )
                if dp > 1:
                    _fail(
                        "pp_schedule",
                        sched,
                        "torch's schedules run here with dp=1 only; use 'gpipe' or '1f1b' with dp",
                    )
        elif self.micro_batches != 1:
            _fail("micro_batches", self.micro_batches, "only pipelines (pp > 1) use it; use 1")
        if self.pp_virtual_stages != 1 and (pp == 1 or sched not in P.CHUNKED_SCHEDULES):
            _fail(
                "pp_virtual_stages",
                self.pp_virtual_stages,
                "only pp_schedule "
                + ", ".join(repr(c) for c in P.CHUNKED_SCHEDULES)
                + " with pp > 1 hold several chunks per rank; use 1",
            )
        if tp > 1:
            if self.clip == "agc":
                _fail(
                    "clip",
                    "agc",
                    "tp splits the rows of row-parallel weights across ranks, so unit-wise "
                    "AGC is not exact; use 'none', 'norm', 'value', 'autoclip' or 'zclip'",
                )
            name = self._mesh_field("tp")
            if preset.n_head % tp:
                _fail(name, getattr(self, name), f"tp={tp} must divide n_head={preset.n_head}")
            if (4 * preset.d_model) % tp:
                _fail(name, getattr(self, name), f"tp={tp} must divide the MLP width")
        if self.cp > 1:
            self._check_context_parallel(preset.block_size)
        if dp > 1 and impl in ("zero2", "zero3") and self.clip == "agc":
            _fail(
                "clip",
                "agc",
                f"dp_impl={impl!r} shards flat buffers that cut across weight rows, so unit-wise "
                "AGC is not exact; use another clip method or dp_impl",
            )

    def _check_context_parallel(self, preset_block_size: int) -> None:
        """What context parallelism composes with here (dp) and what its zig-zag split needs."""
        name = self._mesh_field("cp")
        for dim in ("pp", "tp"):
            if getattr(self, dim) > 1:
                _fail(
                    name,
                    self.cp,
                    f"context parallelism composes with dp here, not with {dim}: set {dim}=1 "
                    f"(got {dim}={getattr(self, dim)})",
                )
        if self.dp_impl not in CP_DP_IMPLS:
            _fail(
                "dp_impl",
                self.dp_impl,
                "with cp > 1 gradients average over dp x cp; use "
                + ", ".join(repr(i) for i in CP_DP_IMPLS),
            )
        block = self.block_size or preset_block_size
        if block % (2 * self.cp):
            _fail(
                "block_size" if self.block_size else name,
                self.block_size or self.cp,
                f"the zig-zag split cuts each sequence of {block} tokens into 2*cp={2 * self.cp} "
                "equal chunks: block_size must be a multiple of it",
            )

    def _mesh_field(self, dim: str) -> str:
        """The field to name for a bad mesh dimension: itself if set, else world_size."""
        return dim if dim in getattr(self, "_set_fields", (dim,)) else "world_size"

    def _validate_schedule(self) -> None:
        for key in self.schedule_kwargs:
            if not isinstance(key, str):
                _fail("schedule_kwargs", self.schedule_kwargs, "keys must be argument names")
            if key in SCHEDULE_FIELDS:
                owner = SCHEDULE_FIELDS[key]
                _fail(
                    "schedule_kwargs",
                    self.schedule_kwargs,
                    f"{key!r} is set by TrainConfig.{owner} (={getattr(self, owner)!r}); "
                    f"set {owner} instead",
                )
        try:
            from labkit.schedules import validate_schedule_args
        except ImportError:  # the schedules module is optional while the package is assembled
            return
        try:
            validate_schedule_args(self.schedule, **self.schedule_args())
        except ValueError as err:
            raise ValueError(f"TrainConfig.schedule: {err}") from None

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again).

        Mesh fields that were derived rather than set (``TrainConfig(strategy="ddp",
        world_size=2)`` derives ``dp=2``) are derived again, so ``replace(world_size=4)`` gives
        ``dp=4``; fields that were set stay, and must agree with the change.
        """
        _check_known(changes)
        was_set = getattr(self, "_set_fields", None)
        kwargs = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in changes
            and (f.name not in DERIVED_FIELDS or was_set is None or f.name in was_set)
        }
        return TrainConfig(**kwargs, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for checkpoints, CSV headers and notebooks)."""
        return dataclasses.asdict(self)

    def schedule_args(self) -> dict[str, Any]:
        """Keyword arguments of ``labkit.schedules.get_schedule`` for this run (beside the name)."""
        return {
            "peak_lr": self.lr,
            "total_steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "warmup": self.warmup,
            "min_lr": self.min_lr,
            "beta2": self.beta2,
            **self.schedule_kwargs,
        }

    def lr_schedule(self) -> Any:
        """The ``labkit.schedules.Schedule`` (step -> lr) this run follows."""
        from labkit.schedules import get_schedule

        return get_schedule(self.schedule, **self.schedule_args())

    def optimizer_spec(self) -> tuple[type, dict[str, Any]]:
        """The optimizer class and its keyword arguments (lr is set by the schedule)."""
        import torch

        if self.optimizer == "sgd":
            return torch.optim.SGD, {
                "lr": self.lr,
                "momentum": self.momentum,
                "weight_decay": self.weight_decay,
            }
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls, {
            "lr": self.lr,
            "betas": (self.beta1, self.beta2),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend of ``compile``, or None when it is off."""
        if self.compile is False:
            return None
        return "inductor" if self.compile is True else self.compile

    @property
    def dp_size(self) -> int:
        """Number of ranks that each take a different slice of the batch (``dp``)."""
        return self.dp

    @property
    def label(self) -> str:
        """A short name for the run's parallelism: ``"ddp x2"``, ``"dp2 x pp2 (zero3, 1f1b)"``."""
        preset = P.PRESETS[self.strategy].dim
        if self.strategy != "mesh" and self.world_size == getattr(self, preset or "dp"):
            return self.strategy if self.world_size == 1 else f"{self.strategy} x{self.world_size}"
        dims = " x ".join(
            f"{d}{getattr(self, d)}" for d in ("dp", "pp", "cp", "tp") if getattr(self, d) > 1
        )
        how = [self.dp_impl] if self.dp > 1 else []
        how += [self.pp_schedule] if self.pp > 1 else []
        return f"{dims} ({', '.join(how)})" if how else dims

    @property
    def mesh_shape(self) -> dict[str, int]:
        """``{"pp": .., "dp": .., "cp": .., "tp": ..}``, outermost dimension first."""
        return {d: getattr(self, d) for d in P.DIMS}


def _check_torch_schedule(name: str) -> None:
    """torch's twin ``name`` must exist in the installed torch (newer schedules are recent)."""
    import torch
    import torch.distributed.pipelining as pipelining

    cls = P.PP_SCHEDULES[name].torch_class
    if not hasattr(pipelining, cls):
        _fail(
            "pp_schedule",
            name,
            f"torch {torch.__version__} has no torch.distributed.pipelining.{cls}; use the "
            "hand-written schedule of the same name without 'torch-', or a newer torch",
        )


def _check_known(names: Any) -> None:
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(
            f"unknown TrainConfig field(s): {', '.join(unknown)}; see labkit.TrainConfig for the list"
        )


_dataclass_init = TrainConfig.__init__


def _init(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
    # The generated __init__ raises TypeError for a misspelt keyword; a config error is a
    # ValueError everywhere (TrainConfig(...), labkit.run(...), the CLI), so say it the same way.
    if args:
        raise ValueError(
            f"TrainConfig takes keyword arguments only (got {len(args)} positional: "
            f"{args[0]!r}...); for example TrainConfig(model='nano', steps=10)"
        )
    _check_known(kwargs)
    object.__setattr__(self, "_set_fields", frozenset(kwargs))  # what replace() must keep
    _dataclass_init(self, **kwargs)


_init.__doc__ = _dataclass_init.__doc__
_init.__signature__ = inspect.signature(_dataclass_init)  # type: ignore[attr-defined]
TrainConfig.__init__ = _init  # type: ignore[method-assign]


def make_config(config: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """``config`` with ``overrides`` applied, or a fresh config from the overrides."""
    if config is not None and not isinstance(config, TrainConfig):
        raise ValueError(
            f"labkit.run's first argument must be a TrainConfig, got {config!r}; pass fields "
            f"as keywords, for example labkit.run(model={config!r})"
            if isinstance(config, str)
            else f"labkit.run's first argument must be a TrainConfig, got {type(config).__name__}"
        )
    _check_known(overrides)
    if config is None:
        return TrainConfig(**overrides)
    return config.replace(**overrides) if overrides else config
