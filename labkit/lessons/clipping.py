"""Helpers for notebook 01, gradient clipping: small measurements and one clearly-labelled toy.

The GPT runs of the lesson go through ``labkit.run`` (the one training loop). What lives here is
deliberately small:

1. ``deepnet_with_grads``: one backward pass of ``DeepNet``, whose gradients explode layer by layer.
2. ``module_grad_norms``: per-parameter norms grouped into per-module norms (for bars/heat maps).
3. ``train_deepnet``: a *toy* 60-step SGD loop on ``DeepNet``, with or without global-norm clipping.
4. ``compare_norm_and_value_clipping``: the same gradients clipped by norm and by value, and
   how much each one turns the update (cosine with the original direction).
5. ``spiky_norms`` and ``spike_table``: a made-up sequence of gradient norms with one spike, fed to
   a fixed threshold, AutoClip and ZClip through a single parameter whose gradient has that norm.
6. ``adam_replay``: a norm sequence replayed through AdamW (optionally clipped first): the step
   AdamW takes per coordinate, in units of the learning rate, and its second-moment estimate.

``summarize_runs`` tabulates the numbers the notebook quotes for any of these runs;
``held_out_gap`` compares a trained model's loss on the training text and on the held-out text.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.clip import (
    AutoClip,
    ZClip,
    clip_grad_norm_,
    clip_grad_value_,
    global_grad_norm,
    grad_cosine,
    per_layer_grad_norms,
    snapshot_grads,
)

__all__ = [
    "DirectionComparison",
    "ToyRun",
    "adam_replay",
    "compare_norm_and_value_clipping",
    "deepnet_with_grads",
    "drive_clipper",
    "first_nonfinite_step",
    "held_out_gap",
    "module_grad_norms",
    "one_thread",
    "parameter_norm_table",
    "regression_data",
    "spike_table",
    "spiky_norms",
    "summarize_runs",
    "train_deepnet",
    "value_for_norm",
]


class DeepNet(nn.Module):
    """A deep plain tanh MLP (no normalisation, no residuals) whose gradients explode.

    With weights drawn at ``gain`` times the 1/sqrt(fan_in) scale and ``gain > 1``, a tanh network
    is in the "chaotic" regime (Poole et al. 2016): activations stay bounded, but each layer
    multiplies the backward signal, so layers near the input get gradients orders of magnitude
    larger than those near the output: the clipping lesson's patient.
    """

    def __init__(self, depth: int = 24, width: int = 64, d_in: int = 16, gain: float = 3.0) -> None:
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.out = nn.Linear(width, 1)
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=gain / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (or the decorated function).

    Models this small gain nothing from more threads, and on a busy machine threads that wait
    for each other make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# 1. A deep network's gradients, one backward pass
# ---------------------------------------------------------------------------------------------


def regression_data(n: int = 256, d_in: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed toy regression task: inputs ``x`` [n, d_in] and targets ``sin(x @ w / 2)`` [n, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(d_in, 1, generator=gen)
    return x, torch.sin(x @ w / 2)


@one_thread()
def deepnet_with_grads(seed: int = 0, batch_size: int = 64, **deepnet_kwargs: Any) -> DeepNet:
    """A freshly initialised ``DeepNet`` after one forward and backward pass (``.grad`` filled)."""
    x, y = regression_data(seed=seed)
    with torch.random.fork_rng(devices=[]):  # leave the notebook's global RNG alone
        torch.manual_seed(seed)
        net = DeepNet(**deepnet_kwargs)
    F.mse_loss(net(x[:batch_size]), y[:batch_size]).backward()
    return net


def module_grad_norms(layer_norms: pd.DataFrame) -> pd.DataFrame:
    """Group per-parameter rows (``name``, ``grad_norm``) into one row per module and step.

    ``blocks.0.attn.q.weight`` and ``blocks.0.attn.q.bias`` become ``blocks.0.attn.q``, whose norm
    is ``sqrt(q.weight**2 + q.bias**2)``: the norm of all the module's gradients as one vector.
    Modules keep the order in which they first appear (the model's order, input to output).
    Works with ``RunResult.layer_norms`` (with ``step``) or a single measurement (without).
    """
    frame = layer_norms.copy()
    frame["module"] = frame["name"].str.rsplit(".", n=1).str[0]
    frame["squared"] = frame["grad_norm"].astype(float) ** 2
    frame["has_nan"] = frame["squared"].isna()
    keys = ["step", "module"] if "step" in frame else ["module"]
    groups = frame.groupby(keys, sort=False)
    grouped = groups["squared"].sum() ** 0.5
    # A plain sum skips nan, which would make a module with a nan gradient look healthy.
    grouped[groups["has_nan"].any()] = math.nan
    out = grouped.rename("grad_norm").reset_index()
    order = {name: i for i, name in enumerate(dict.fromkeys(frame["module"]))}
    sort_keys = ["order", "step"] if "step" in frame else ["order"]
    out = out.assign(order=out["module"].map(order)).sort_values(sort_keys, kind="stable")
    return out.drop(columns="order").reset_index(drop=True)


def parameter_norm_table(model: nn.Module) -> pd.DataFrame:
    """The current per-parameter gradient norms of ``model`` as a ``name, grad_norm`` table."""
    norms = per_layer_grad_norms(model)
    return pd.DataFrame({"name": list(norms), "grad_norm": list(norms.values())})


# ---------------------------------------------------------------------------------------------
# 2. A toy SGD loop on DeepNet (the GPT uses labkit.run; this is only the 24-layer toy)
# ---------------------------------------------------------------------------------------------


@dataclass
class ToyRun:
    """What ``train_deepnet`` returns, shaped like a ``RunResult``'s tables."""

    metrics: pd.DataFrame  # step, loss, grad_norm, grad_norm_clipped, skipped
    layer_norms: pd.DataFrame  # step, rank, name, grad_norm (per parameter, before clipping)


@one_thread()
def train_deepnet(
    lr: float = 0.1,
    max_norm: float | None = None,
    steps: int = 60,
    batch_size: int = 32,
    seed: int = 0,
) -> ToyRun:
    """Train ``DeepNet`` on the toy regression with plain SGD, clipping by global norm if asked.

    A toy, kept to the bare steps: forward, backward, measure (and clip), step. Like labkit's
    loop it records the norm *before* clipping and skips a step whose norm is not finite.
    """
    x, y = regression_data(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DeepNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    rows, norm_rows = [], []
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.mse_loss(net(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, value in per_layer_grad_norms(net).items():
            norm_rows.append((step, 0, name, value))
        if max_norm is None:
            norm = float(global_grad_norm(net.parameters()))
        else:
            norm = float(clip_grad_norm_(net.parameters(), max_norm))
        finite = math.isfinite(norm)
        if finite:
            optimizer.step()
        rows.append(
            {
                "step": step,
                "loss": loss.item(),
                "grad_norm": norm,
                "grad_norm_clipped": float(global_grad_norm(net.parameters())),
                "skipped": not finite,
            }
        )
    layer_norms = pd.DataFrame(norm_rows, columns=["step", "rank", "name", "grad_norm"])
    return ToyRun(pd.DataFrame(rows), layer_norms)


def first_nonfinite_step(frame: pd.DataFrame, column: str = "loss") -> int | None:
    """The first step whose ``column`` is nan or inf (None if the run stayed finite)."""
    bad = frame.loc[~np.isfinite(frame[column].to_numpy(dtype=float)), "step"]
    return int(bad.iloc[0]) if len(bad) else None


def summarize_runs(runs: Mapping[str, Any]) -> pd.DataFrame:
    """One row per labelled run (a RunResult, a ToyRun or a metrics DataFrame): the numbers
    the lesson quotes.

    ``start_loss`` and ``end_loss`` average the first and last five steps (single steps are
    noisy); ``clipped_steps`` counts steps whose norm the clipper reduced; ``val_loss`` is the
    last validation loss (RunResults only); ``nonfinite_from`` is the first step whose loss was
    nan/inf.
    """
    rows = {}
    for label, run in runs.items():
        m = run.metrics if hasattr(run, "metrics") else run
        if "rank" in m:
            m = m[m["rank"] == 0]
        val = m["val_loss"].dropna() if "val_loss" in m else pd.Series(dtype=float)
        rows[label] = {
            "start_loss": float(m["loss"].head(5).mean()),
            "end_loss": float(m["loss"].tail(5).mean()),
            "val_loss": float(val.iloc[-1]) if len(val) else math.nan,
            "largest_grad_norm": float(m["grad_norm"].max()),
            "clipped_steps": int((m["grad_norm_clipped"] < m["grad_norm"] * (1 - 1e-3)).sum()),
            "skipped_steps": int(m["skipped"].sum()),
            "nonfinite_from": first_nonfinite_step(m),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table.astype({"nonfinite_from": "Int64"})  # an integer step, or <NA>


# ---------------------------------------------------------------------------------------------
# 3. Norm versus value clipping: does the update keep its direction?
# ---------------------------------------------------------------------------------------------


@dataclass
class DirectionComparison:
    """The same gradients clipped two ways; ``modules`` has one row per module with columns
    ``module, original, norm, value`` (gradient norms)."""

    modules: pd.DataFrame
    max_norm: float
    clip_value: float
    cosine_norm: float  # cosine between the original and the norm-clipped gradient
    cosine_value: float  # ... and the value-clipped gradient


@torch.no_grad()
def value_for_norm(grads: list[Tensor], target_norm: float) -> float:
    """The ``clip_value`` whose element clamping leaves a global 2-norm of ``target_norm``.

    The clamped norm grows with the clip value, so a bisection (in log space, since gradients
    span orders of magnitude) finds it. Used so that both clippings shrink to the *same* norm
    and differ only in direction.
    """
    flat = torch.cat([g.reshape(-1).double().abs() for g in grads])
    if float(flat.norm()) <= target_norm:
        return float(flat.max())  # no clamping needed at all
    lo, hi = 1e-12, float(flat.max())
    for _ in range(60):  # the log-interval shrinks 2**60-fold: far below float precision
        mid = math.sqrt(lo * hi)
        if float(flat.clamp(max=mid).norm()) < target_norm:
            lo = mid
        else:
            hi = mid
    return hi


@one_thread()
def compare_norm_and_value_clipping(model: nn.Module, max_norm: float = 1.0) -> DirectionComparison:
    """Clip ``model``'s gradients by norm and, separately, by value to the same global norm.

    The model's gradients are left as they were. Returns per-module norms and the cosine of each
    clipped gradient with the original: 1.0 means the direction is kept.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    original = snapshot_grads(params)
    clip_value = value_for_norm(original, max_norm)

    def clipped_with(clip: Callable[[list[Tensor]], object]) -> tuple[pd.DataFrame, float]:
        for p, g in zip(params, original, strict=True):
            p.grad = g.clone()
        clip(params)
        table = module_grad_norms(parameter_norm_table(model))
        return table, grad_cosine(original, snapshot_grads(params))

    before = module_grad_norms(parameter_norm_table(model))
    by_norm, cos_norm = clipped_with(lambda ps: clip_grad_norm_(ps, max_norm))
    by_value, cos_value = clipped_with(lambda ps: clip_grad_value_(ps, clip_value))
    for p, g in zip(params, original, strict=True):  # restore the unclipped gradients
        p.grad = g
    modules = pd.DataFrame(
        {
            "module": before["module"],
            "original": before["grad_norm"],
            "norm": by_norm["grad_norm"],
            "value": by_value["grad_norm"],
        }
    )
    return DirectionComparison(modules, max_norm, clip_value, cos_norm, cos_value)


# ---------------------------------------------------------------------------------------------
# 4. An injected spike: fixed threshold versus AutoClip and ZClip
# ---------------------------------------------------------------------------------------------


def spiky_norms(
    steps: int = 100,
    spike_at: int = 70,
    spike_factor: float = 8.0,
    start: float = 3.0,
    floor: float = 0.5,
    seed: int = 0,
) -> list[float]:
    """Gradient norms as training often shows them, plus one spike.

    The typical norm decays from ``start`` towards ``floor`` (early training has large
    gradients) with +-5 % noise; at step ``spike_at`` the norm is ``spike_factor`` times the
    typical norm of that moment (a bad batch, a loss spike).
    """
    rng = random.Random(seed)
    norms = []
    for t in range(steps):
        typical = floor + (start - floor) * math.exp(-t / 15)
        norms.append(typical * (1 + 0.05 * rng.uniform(-1, 1)))
    if 0 <= spike_at < steps:
        norms[spike_at] *= spike_factor
    return norms


@torch.no_grad()
def drive_clipper(clipper: Callable[[list[Tensor]], object], norms: list[float]) -> list[float]:
    """Feed ``clipper`` one parameter whose gradient has each norm in turn; return the norms after.

    The clippers only ever see the gradient's norm (and direction), so a 4-element parameter with
    a fixed unit direction is all it takes to replay a norm sequence.
    """
    p = nn.Parameter(torch.zeros(4))
    direction = torch.tensor([0.5, -0.5, 0.5, 0.5])  # a unit vector
    after = []
    for n in norms:
        p.grad = direction * n
        clipper([p])
        after.append(float(p.grad.norm()))
    return after


def spike_table(
    norms: list[float],
    max_norm: float = 5.0,
    autoclip_percentile: float = 10.0,
    zclip_z: float = 2.5,
    zclip_alpha: float = 0.97,
    zclip_warmup: int = 25,
) -> pd.DataFrame:
    """Replay ``norms`` through three clippers; one row per step.

    Columns: ``step, pre_clip, fixed, autoclip, zclip`` (norms after each clipper). The fixed
    threshold ``max_norm`` is ``clip_grad_norm_`` as every step would call it.
    """
    return pd.DataFrame(
        {
            "step": range(len(norms)),
            "pre_clip": norms,
            "fixed": drive_clipper(lambda ps: clip_grad_norm_(ps, max_norm), norms),
            "autoclip": drive_clipper(AutoClip(percentile=autoclip_percentile), norms),
            "zclip": drive_clipper(
                ZClip(alpha=zclip_alpha, z_thresh=zclip_z, warmup_steps=zclip_warmup), norms
            ),
        }
    )


# ---------------------------------------------------------------------------------------------
# 5. Clipping under AdamW: the step is about lr per coordinate, whatever the norm
# ---------------------------------------------------------------------------------------------


def adam_replay(
    norms: list[float],
    max_norm: float | None = None,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> pd.DataFrame:
    """Replay gradient norms through ``torch.optim.AdamW``, clipping each to ``max_norm`` first.

    As in ``drive_clipper``, one 4-element parameter gets a gradient of each norm in turn along a
    fixed unit direction (so every coordinate has the same size), optionally clipped by
    ``clip_grad_norm_``, and AdamW (labkit's defaults: betas 0.9/0.95, no weight decay) steps.
    One row per step: ``grad_norm`` (the norm AdamW received, after clipping), ``step_over_lr``
    (the root-mean-square change of a coordinate, in units of ``lr``) and ``sqrt_v`` (the square
    root of AdamW's bias-corrected second-moment estimate, root-mean-square over coordinates: the
    gradient size AdamW divides by). SGD's step would be ``lr * grad_norm``; AdamW's is near ``lr``
    per coordinate whatever the norm, because it divides by ``sqrt_v``.
    """
    p = nn.Parameter(torch.zeros(4))
    direction = torch.tensor([0.5, -0.5, 0.5, 0.5])  # a unit vector
    optimizer = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    rows = []
    for step, n in enumerate(norms):
        p.grad = direction * n
        if max_norm is not None:
            clip_grad_norm_([p], max_norm)
        fed = float(p.grad.norm())
        before = p.detach().clone()
        optimizer.step()
        change = p.detach() - before
        v_hat = optimizer.state[p]["exp_avg_sq"] / (1 - betas[1] ** (step + 1))
        rows.append(
            {
                "step": step,
                "grad_norm": fed,
                "step_over_lr": float(change.pow(2).mean().sqrt()) / lr,
                "sqrt_v": float(v_hat.mean().sqrt()),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 6. Why validation loss can sit below training loss: what the held-out text is
# ---------------------------------------------------------------------------------------------


def _topic_span(corpus: str, start: int, stop: int) -> str:
    """The first and last pydoc topic that characters ``start:stop`` of the corpus fall in."""
    if corpus != "pydoc":
        return ""
    from pydoc_data.topics import topics

    names, ends, pos = sorted(topics), [], 0
    for name in names:  # the corpus joins the topics in this order with "\n\n" (data.pydoc_text)
        pos += len(topics[name]) + 2
        ends.append(pos)
    first = next(i for i, end in enumerate(ends) if end > start)
    last = next(i for i, end in enumerate(ends) if end > stop - 1)
    return f"{names[first]} ... {names[last]}"


@one_thread()
@torch.no_grad()
def held_out_gap(result: Any, n_batches: int = 16) -> pd.DataFrame:
    """The trained model of ``result`` (a ``RunResult``) scored on its training and held-out text.

    Both rows use the *same* weights (the end of the run) and the same number of fixed random
    windows (``n_batches`` batches of the validation batch size), one set drawn from the training
    text and one from the held-out text (``labkit.data``: the corpus's last 10 %). ``loss`` is
    the mean next-token cross-entropy; ``char_entropy`` the entropy of the text's character
    frequencies (nats), a model-free measure of how predictable its characters are; ``topics``
    the first and last pydoc topic each part covers (the corpus is the topics in alphabetical
    order). A held-out loss below the training loss with the same weights says the held-out text
    is easier, not that the model generalises better than it fits.
    """
    from labkit.data import global_batch, load_corpus
    from labkit.model import lm_loss_sum
    from labkit.train import VAL_BATCH_SIZE, build_model

    cfg = result.config
    corpus = load_corpus(cfg.corpus)
    model = build_model(cfg)
    model.load_state_dict(result.state_dict())
    model.eval()
    n_train = len(corpus.train)
    parts = {
        "training text": (corpus.train, 0, n_train),
        "held-out text": (corpus.val, n_train, n_train + len(corpus.val)),
    }
    rows = {}
    for label, (tokens, start, stop) in parts.items():
        total, count = 0.0, 0
        for i in range(n_batches):
            x, y = global_batch(
                tokens,
                seed=cfg.seed,
                step=i,
                batch_size=VAL_BATCH_SIZE,
                block_size=model.cfg.block_size,
                stream=1,  # the validation stream: windows the training steps did not draw
            )
            total += float(lm_loss_sum(model(x), y))
            count += y.numel()
        freq = torch.bincount(tokens, minlength=corpus.vocab_size).double()
        freq = freq[freq > 0] / freq.sum()
        rows[label] = {
            "topics": _topic_span(cfg.corpus, start, stop),
            "characters": len(tokens),
            "char_entropy": float(-(freq * freq.log()).sum()),
            "loss": total / count,
        }
    return pd.DataFrame.from_dict(rows, orient="index")
