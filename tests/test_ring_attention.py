"""Ring attention (context parallelism): equal to dense causal attention, output and gradients."""

from __future__ import annotations

import pytest
import torch

from labkit.lessons.context_parallel import compare_with_dense
from labkit.parallel.ring_attention import zigzag_positions, zigzag_shard


def test_zigzag_gives_each_rank_one_early_and_one_late_chunk():
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    every = torch.cat([zigzag_positions(16, r, 4) for r in range(4)])
    assert sorted(every.tolist()) == list(range(16))
    # Causal work (keys at or before each query) is equal on every rank.
    work = [int((zigzag_positions(16, r, 4) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1
    x = torch.arange(8).view(1, 8, 1)
    assert zigzag_shard(x, 1, 2, dim=1).flatten().tolist() == [2, 3, 4, 5]


def test_a_sequence_that_does_not_cut_evenly_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        zigzag_positions(12, 0, 4)


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_attention_equals_dense_causal_attention(world_size):
    # 3 heads (odd: the ring never splits heads), 32 tokens: 4 or 8 zig-zag chunks.
    errors = compare_with_dense(world_size, heads=3, seq_len=32)
    assert len(errors) == world_size
    worst = errors[["output", "dq", "dk", "dv"]].max()
    assert (worst <= 1e-5).all(), worst.to_dict()
    # Each rank holds 1/W of the keys and values.
    assert (errors["kv_bytes_held"] == 2 * 2 * 3 * (32 // world_size) * 8 * 4).all()
