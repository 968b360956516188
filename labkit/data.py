"""Text corpora, a character tokenizer, and batches that are a pure function of (seed, step).

The default corpus is real English: the documentation topics that ship inside CPython
(``pydoc_data.topics``), so nothing is downloaded. A tiny synthetic corpus keeps tests fast.

Determinism is the point of this file. ``global_batch(seed, step)`` draws the *whole* global batch
from a generator seeded by (seed, step); a rank keeps only its rows (``shard_rows``). So every
strategy, on any number of ranks, trains on exactly the batch the single-process run sees. That is
what makes the equivalence invariant testable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

VAL_FRACTION = 0.1  # the last 10% of the corpus is held out, always the same characters


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus: the vocabulary (one character a token) and train/validation tokens."""

    name: str
    chars: str
    train: torch.Tensor
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Characters to token ids (unknown characters raise KeyError)."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        """Token ids back to text."""
        return "".join(self.chars[int(t)] for t in tokens)


def pydoc_text() -> str:
    """The documentation text shipped with CPython: ~465k characters of English about Python."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def synthetic_text(n_sentences: int = 4000, seed: int = 1234) -> str:
    """A small generated corpus with learnable structure (subject-verb-object sentences)."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the model", "my gpu", "a rank", "the loss", "our team"]
    verbs = ["sees", "trains", "clips", "sends", "warms", "reduces", "shards"]
    objects = ["the batch", "a gradient", "the norm", "every layer", "two stages", "the schedule"]
    words = (
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
        for _ in range(n_sentences)
    )
    return " ".join(words)


@lru_cache(maxsize=4)
def load_corpus(name: str = "pydoc") -> Corpus:
    """Load and tokenise a corpus by name: ``"pydoc"`` (default) or ``"synthetic"``.

    Cached per process; tokenising the pydoc corpus takes well under a second.
    """
    if name == "pydoc":
        text = pydoc_text()
    elif name == "synthetic":
        text = synthetic_text()
    else:
        raise ValueError(f"corpus={name!r} is invalid: allowed: 'pydoc', 'synthetic'")
    chars = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(chars)}
    # device="cpu" explicitly: this result is cached, and must not inherit a caller's default
    # device (a `with torch.device("meta"):` block would otherwise poison every later run).
    tokens = torch.tensor([lookup[c] for c in text], dtype=torch.long, device="cpu")
    n_val = int(len(tokens) * VAL_FRACTION)
    return Corpus(name=name, chars=chars, train=tokens[:-n_val], val=tokens[-n_val:])


def model_vocab_size(corpus: str, requested: int | None) -> int:
    """Rows of the model's embedding and head: the corpus's characters, or ``requested``
    (``TrainConfig.vocab_size``), which must hold every one of them."""
    have = load_corpus(corpus).vocab_size
    if requested is None:
        return have
    if requested < have:
        raise ValueError(
            f"TrainConfig.vocab_size={requested} is invalid: corpus {corpus!r} has {have} "
            f"characters, so the vocabulary needs at least {have} rows"
        )
    return requested


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    # Distinct, reproducible streams for (seed, step, train/val) without global RNG state.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


def global_batch(
    tokens: torch.Tensor, *, seed: int, step: int, batch_size: int, block_size: int, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step ``step``: inputs and next-token targets, [B, T] each.

    A pure function of its arguments: call it on any rank, any time, and get the same tensors.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(
            f"block_size={block_size} is too long for a corpus of {len(tokens)} tokens"
        )
    g = _generator(seed, step, stream)
    starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=g)
    offsets = torch.arange(block_size + 1)
    windows = tokens[starts[:, None] + offsets]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def shard_rows(n_rows: int, rank: int, world_size: int) -> slice:
    """Rows of a batch of ``n_rows`` that ``rank`` of ``world_size`` takes.

    Contiguous blocks; when ``n_rows`` does not divide evenly, the first ``n_rows % world_size``
    ranks take one extra row (as ``torch.tensor_split`` does). The slices of all ranks, in rank
    order, concatenate to the whole batch.
    """
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def split_micro_batches(
    x: torch.Tensor, y: torch.Tensor, n: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batch into ``n`` micro-batches along the rows (sizes differ by at most one)."""
    return [(x[s], y[s]) for s in (shard_rows(len(x), i, n) for i in range(n))]


def validation_batches(
    corpus: Corpus, *, seed: int, n_batches: int, batch_size: int, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of held-out batches (the same at every evaluation, on every rank)."""
    return [
        global_batch(
            corpus.val, seed=seed, step=i, batch_size=batch_size, block_size=block_size, stream=1
        )
        for i in range(n_batches)
    ]
