"""A small GPT, a deep plain network whose gradients explode, and FLOP counts.

The GPT is written as three kinds of layer, ``Embedding -> Block x n_layer -> Head``, and
``GPT.layers()`` lists them in order. That list is what the pipeline cuts into stages, and the
attention/MLP linears are what tensor parallelism splits, so both parallel versions keep the
parameter names of this model (``blocks.3.attn.q.weight``) and their state dicts compare directly.

Layer norm placement is a switch: ``norm="pre"`` (GPT-2 and later: ``x + f(LN(x))``) or
``norm="post"`` (the original Transformer: ``LN(x + f(x))``), which needs warm-up to train at high
learning rates (Liu et al. 2020, Xiong et al. 2020); notebook 02 reproduces that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT. ``vocab_size`` comes from the corpus."""

    n_layer: int
    n_head: int
    d_model: int
    block_size: int
    vocab_size: int = 128
    norm: str = "pre"

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head


# From a test-sized model (nano, ~32k parameters) to ones worth a GPU (large, ~85M; xl, GPT-2
# medium's shape, ~302M in its blocks: the GPU preset for which MFU means something, best with
# TrainConfig.vocab_size=50304 so that its head costs what a real tokenizer's would).
PRESETS: dict[str, GPTConfig] = {
    "nano": GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=32),
    "micro": GPTConfig(n_layer=4, n_head=4, d_model=64, block_size=64),
    "small": GPTConfig(n_layer=4, n_head=4, d_model=128, block_size=64),
    "medium": GPTConfig(n_layer=6, n_head=8, d_model=256, block_size=256),
    "large": GPTConfig(n_layer=12, n_head=12, d_model=768, block_size=512),
    "xl": GPTConfig(n_layer=24, n_head=16, d_model=1024, block_size=1024),
}


def model_config(
    preset: str, *, vocab_size: int, norm: str = "pre", block_size: int | None = None
) -> GPTConfig:
    """The preset's shape with the corpus vocabulary, norm placement and optional context length."""
    cfg = replace(PRESETS[preset], vocab_size=vocab_size, norm=norm)
    return replace(cfg, block_size=block_size) if block_size else cfg


class Embedding(nn.Module):
    """Token plus learned position embeddings.

    ``positions`` maps the number of tokens a rank holds to their places in the sequence: all of
    them in order by default; context parallelism sets it to the rank's zig-zag chunks.
    """

    positions: Callable[[int, torch.device], torch.Tensor] | None = None

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        positions = (
            self.positions(t, idx.device)
            if self.positions is not None
            else torch.arange(t, device=idx.device)
        )
        return self.tok(idx) + self.pos(positions)


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v projections.

    Separate projections (rather than one fused qkv) make the tensor-parallel split by heads a
    plain column split of each matrix. ``core`` computes causal attention from ``q, k, v``
    (``[B, heads, T, head_dim]``): the fused ``scaled_dot_product_attention`` by default, ring
    attention under context parallelism.
    """

    core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        # No key bias: it adds the same q.b to every score of a query, which softmax cancels, so
        # its gradient is exactly zero in theory and float noise in practice (Adam would then
        # turn that noise into full-size updates and break bitwise comparisons).
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output before the output projection, heads concatenated: [B, T, width]."""
        b, t, _ = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_head, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.core is not None:
            out = self.core(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.heads(x))


class MLP(nn.Module):
    """Two-layer feed-forward network, 4x wide, GELU."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class _Keeps(torch.autograd.Function):
    """Identity on ``out`` that saves ``x`` for backward: the memory checkpoint keeps anyway.

    Checkpointing holds a block's input outside autograd's saved tensors, where a
    ``saved_tensors_hooks`` meter cannot see it; saving it here (no copy, the same storage)
    makes ``RunResult.memory`` count it.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _keeps(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _Keeps.apply(out, x)


class Block(nn.Module):
    """One transformer block; ``norm`` picks pre-LN or post-LN residuals.

    ``recompute`` (set by the trainer from ``TrainConfig.recompute``): ``"full"`` keeps only the
    block's input for backward and runs the block again there; ``"selective"`` does that for
    the attention sub-layer only (its scores are large and cheap to recompute). Both use
    non-reentrant ``torch.utils.checkpoint``: the same operations on the same values, so the
    gradients are the same as without it.
    """

    recompute = "none"

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm = cfg.norm
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_head)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return _keeps(checkpoint(self._forward, x, use_reentrant=False), x)
        return self._forward(x)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "selective" and torch.is_grad_enabled():
            return checkpoint(self.attn, x, use_reentrant=False)
        return self.attn(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self._attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self._attention(x))
        return self.ln2(x + self.mlp(x))


class Head(nn.Module):
    """Final layer norm (pre-LN models only; post-LN output is already normalised) and logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class GPT(nn.Module):
    """A decoder-only transformer: ``Embedding -> blocks -> Head``, returning logits [B, T, V]."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = Head(cfg)
        self.apply(self._init)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def layers(self) -> list[nn.Module]:
        """The layers in order, for cutting into pipeline stages: embedding, blocks, head."""
        return [self.embed, *self.blocks, self.head]

    def layer_names(self) -> list[str]:
        """The state-dict prefix of each entry of ``layers()``."""
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_gpt(cfg: GPTConfig, seed: int) -> GPT:
    """A GPT initialised from ``seed`` only, so every rank builds identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg)


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (callers divide by the global token count)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
    )


def count_params(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def matmul_params(module: nn.Module) -> int:
    """Parameters that take part in matrix multiplies: Linear weights (not biases, norms, tables)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward): ``6 N + 12 L d T``.

    ``N`` counts the weights of matrix multiplies (embedding look-ups cost no FLOPs; the output
    projection does), the attention term is ``QK^T`` and ``AV`` over the full context ``T``
    (Kaplan et al. 2020; PaLM appendix B). Biases and layer norms are left out, as is customary.
    """
    d, layers, t = cfg.d_model, cfg.n_layer, cfg.block_size
    n = layers * (4 * d * d + 8 * d * d) + d * cfg.vocab_size
    return 6 * n + 12 * layers * d * t
