"""Batches are pure functions of (seed, step); rank shards concatenate to the global batch."""

import pytest
import torch

from labkit.data import global_batch, load_corpus, shard_rows, split_micro_batches


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("pydoc")


def test_pydoc_corpus_is_real_english(corpus):
    assert len(corpus.train) > 300_000
    text = corpus.decode(corpus.train[:2000])
    assert " the " in text
    assert corpus.decode(corpus.encode("for loop")) == "for loop"
    # The split is fixed: validation text is the tail, disjoint from training text.
    assert len(corpus.val) == pytest.approx(0.1 * (len(corpus.train) + len(corpus.val)), rel=0.01)


def test_batches_are_deterministic_and_targets_shifted(corpus):
    a = global_batch(corpus.train, seed=3, step=5, batch_size=6, block_size=16)
    b = global_batch(corpus.train, seed=3, step=5, batch_size=6, block_size=16)
    c = global_batch(corpus.train, seed=3, step=6, batch_size=6, block_size=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])


def test_global_rng_does_not_change_batches(corpus):
    torch.manual_seed(0)
    a = global_batch(corpus.train, seed=1, step=0, batch_size=4, block_size=8)
    torch.manual_seed(123)
    b = global_batch(corpus.train, seed=1, step=0, batch_size=4, block_size=8)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize(("n", "world"), [(8, 2), (7, 2), (10, 3), (3, 3), (5, 4)])
def test_rank_shards_concatenate_to_the_global_batch(corpus, n, world):
    x, y = global_batch(corpus.train, seed=0, step=2, batch_size=n, block_size=8)
    shards = [x[shard_rows(n, r, world)] for r in range(world)]
    assert torch.equal(torch.cat(shards), x)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    micro = split_micro_batches(x, y, 3)
    assert torch.equal(torch.cat([m[0] for m in micro]), x)


def test_synthetic_corpus_is_small_and_deterministic():
    a, b = load_corpus("synthetic"), load_corpus("synthetic")
    assert a.vocab_size < 40
    assert torch.equal(a.train, b.train)


def test_corpus_cache_ignores_the_callers_default_device():
    load_corpus.cache_clear()
    with torch.device("meta"):
        corpus = load_corpus("synthetic")
    assert corpus.train.device.type == "cpu"
    load_corpus.cache_clear()
