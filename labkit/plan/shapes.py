"""A model's shape for the planner: parameter counts, FLOPs and saved activations per token.

``ModelShape`` describes labkit's GPT (learned positions, a 4x GELU MLP) and Llama-style models
(SwiGLU MLP, grouped-query attention, rotary positions), so the planner can answer questions about
models far larger than this machine trains. ``from_preset`` reads labkit's own presets.

The activation count is the one ``labkit.memory.SavedTensorMeter`` measures: for a pre-LN GPT block
in float32 it is ``16 B T d`` elements (layer-norm inputs and outputs, q, k, v, the attention output,
the MLP's two 4d-wide tensors) plus ``(4 + h) B T`` for the norms' statistics and attention's
log-sum-exp; ``tests/test_plan.py`` checks it against the meter byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PUBLISHED", "ModelShape", "from_preset"]


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a transformer's cost."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    ffn_dim: int | None = None  # default 4 d (GPT); Llama sets its own
    n_kv_head: int | None = None  # grouped-query attention; default n_head
    gated: bool = False  # SwiGLU (three MLP matrices) instead of GELU (two)
    learned_positions: bool = True  # GPT's position table; Llama's rotary adds no parameters
    norm: str = "pre"

    @property
    def ffn(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.ffn_dim or 4 * self.d_model

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.d_model * (self.n_kv_head or self.n_head) // self.n_head

    # --- parameters ---------------------------------------------------------------------------

    def attention_matmul_params(self) -> int:
        """Weights of q, k, v and the output projection of one block."""
        return 2 * self.d_model * self.d_model + 2 * self.d_model * self.kv_dim

    def mlp_matmul_params(self) -> int:
        """Weights of one block's MLP."""
        return (3 if self.gated else 2) * self.d_model * self.ffn

    def block_params(self) -> int:
        """All parameters of one block: matrices, biases (GPT only) and norms."""
        d = self.d_model
        matrices = self.attention_matmul_params() + self.mlp_matmul_params()
        if self.gated:  # Llama: no biases, two RMSNorm weights
            return matrices + 2 * d
        biases = d + self.kv_dim + d + self.ffn + d  # q, v, proj, fc, mlp proj (no key bias)
        return matrices + biases + 4 * d  # two LayerNorms, weight and bias

    def block_tensors(self) -> int:
        """Parameter tensors of one block (the naive all-reduce sends one message each)."""
        return 9 if self.gated else 15

    def block_modules(self) -> int:
        """Modules of one block that own parameters (the units labkit's ZeRO-3 gathers)."""
        return 9 if self.gated else 8  # q, k, v, output, 2 (3) MLP matrices, 2 norms

    def embed_params(self) -> int:
        """The token table, and the position table when positions are learned."""
        return self.vocab_size * self.d_model + self.learned_positions * self.seq_len * self.d_model

    def head_params(self) -> int:
        """Final norm (pre-LN only) and the output projection."""
        norm = 0 if self.norm == "post" else (1 if self.gated else 2) * self.d_model
        return norm + self.d_model * self.vocab_size

    def params(self) -> int:
        """Every parameter of the model."""
        return self.embed_params() + self.n_layer * self.block_params() + self.head_params()

    def matmul_params(self) -> int:
        """Weights that take part in matrix multiplies (the ``N`` of the 6N rule)."""
        block = self.attention_matmul_params() + self.mlp_matmul_params()
        return self.n_layer * block + self.d_model * self.vocab_size

    # --- FLOPs per token ----------------------------------------------------------------------

    def attention_core_flops(self) -> int:
        """Forward FLOPs per token of ``QK^T`` and ``AV`` in one layer, over the full context."""
        return 4 * self.seq_len * self.d_model

    def forward_flops_per_token(self) -> int:
        """Forward FLOPs per token: ``2 N`` plus attention (labkit's ``flops_per_token`` / 3)."""
        return 2 * self.matmul_params() + self.n_layer * self.attention_core_flops()

    def recompute_flops_per_token(self, recompute: str) -> int:
        """Extra forward FLOPs per token that recomputation re-runs during backward."""
        if recompute == "full":  # every block again (the head is not checkpointed)
            return self.forward_flops_per_token() - 2 * self.d_model * self.vocab_size
        if recompute == "selective":  # the attention sub-layer of every block
            return self.n_layer * (2 * self.attention_matmul_params() + self.attention_core_flops())
        return 0

    def train_flops_per_token(self) -> int:
        """Forward + backward (backward costs twice forward): labkit's ``flops_per_token``."""
        return 3 * self.forward_flops_per_token()

    # --- activations saved for backward, elements per sequence --------------------------------

    def block_activations(self, tp: int = 1, recompute: str = "none") -> tuple[float, float]:
        """Elements one block saves per token: ``(kept, recompute_transient)``.

        ``kept`` stays until the block's backward; under recomputation the block re-creates the
        rest during backward (``recompute_transient``), one block at a time, hidden from the meter.
        Tensor parallelism splits q, k, v, the attention output and the MLP's wide tensors.
        """
        d, h = self.d_model, self.n_head
        kv = self.kv_dim
        attention = (d + 2 * kv + d) / tp + h / tp  # q, k, v, output; log-sum-exp per head
        mlp = (4 if self.gated else 2) * self.ffn / tp
        replicated = 4 * d + 4  # two norms' inputs and outputs, their mean and 1/std
        full = replicated + attention + mlp
        if recompute == "full":
            return d, full
        if recompute == "selective":
            return full - attention, attention
        return full, 0.0

    def embed_activation_bytes(self, sequences: float, tokens: int) -> float:
        """Bytes the embedding saves: int64 token ids, and the positions looked up (once)."""
        return 8 * sequences * tokens + (8 * tokens if self.learned_positions else 0)

    def head_activation_bytes(self, sequences: float, tokens: int, act_bytes: int = 4) -> float:
        """Bytes the head and loss save: the final norm's input and statistics (pre-LN), the
        projection's input, the logits, the int64 targets and the loss."""
        n, d, a = sequences * tokens, self.d_model, act_bytes
        norm = 0 if self.norm == "post" else d * a + 8
        return n * (norm + d * a + self.vocab_size * a + 8) + 4


def from_preset(preset: str, vocab_size: int, block_size: int | None = None) -> ModelShape:
    """The shape of one of labkit's GPT presets (``nano`` ... ``xl``)."""
    from labkit.model import PRESETS

    cfg = PRESETS[preset]
    return ModelShape(
        name=preset,
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        n_head=cfg.n_head,
        vocab_size=vocab_size,
        seq_len=block_size or cfg.block_size,
    )


# Published models the notebook plans for (shapes from the model cards / papers).
PUBLISHED: dict[str, ModelShape] = {
    m.name: m
    for m in (
        # Llama 2 7B (Touvron et al. 2023, table 1 / the Hugging Face config): 32 x 4096, 11008.
        ModelShape("llama-2-7b", 32, 4096, 32, 32000, 4096, 11008, None, True, False),
        # Llama 3.1 8B (Meta model card / config.json): 32 x 4096, GQA 8 KV heads, 14336, 128256.
        ModelShape("llama-3.1-8b", 32, 4096, 32, 128256, 8192, 14336, 8, True, False),
        # Llama 3.1 70B: 80 x 8192, 64 heads, 8 KV heads, 28672.
        ModelShape("llama-3.1-70b", 80, 8192, 64, 128256, 8192, 28672, 8, True, False),
        # Megatron-LM's 1T GPT (Narayanan et al. 2021, table 1): 128 x 25600, 160 heads.
        ModelShape("megatron-1t", 128, 25600, 160, 51200, 2048),
    )
}
