"""Which rows each rank reads (`vilbert/cache/sampler.py`): seeded permutations, shard windows, rank slices."""

from __future__ import annotations

import numpy as np
import pytest

from vilbert.cache import EpochSampler


def epoch_indices(sampler: EpochSampler, epoch: int) -> np.ndarray:
    return np.concatenate(sampler.batches(epoch)) if len(sampler) else np.empty(0, np.int64)


@pytest.mark.parametrize("shard_window", [None, 1, 2])
def test_every_epoch_is_a_new_permutation(shard_window):
    starts = np.array([0, 7, 14, 21, 23])
    sampler = EpochSampler(num_rows=23, batch_size=5, seed=3, shard_starts=starts, shard_window=shard_window)
    orders = [epoch_indices(sampler, e) for e in range(4)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(23))
    assert len({tuple(o) for o in orders}) == 4
    again = EpochSampler(num_rows=23, batch_size=5, seed=3, shard_starts=starts, shard_window=shard_window)
    assert np.array_equal(epoch_indices(again, 2), orders[2])
    assert not np.array_equal(epoch_indices(EpochSampler(num_rows=23, batch_size=5, seed=4), 2), orders[2])


def test_shard_window_reads_few_shards_at_a_time():
    starts = np.arange(0, 101, 10)  # 10 shards of 10 rows
    sampler = EpochSampler(num_rows=100, batch_size=10, seed=0, shard_starts=starts, shard_window=2)
    order = epoch_indices(sampler, 0)
    shards = np.searchsorted(starts, order, side="right") - 1
    for window in range(5):  # each run of 20 rows comes from exactly two shards
        assert len(set(shards[window * 20 : (window + 1) * 20].tolist())) == 2


@pytest.mark.parametrize("num_rows", [20, 23, 3])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_cover_the_epoch_and_have_equal_batch_counts(num_rows, world_size, drop_last):
    samplers = [
        EpochSampler(num_rows=num_rows, batch_size=4, seed=0, rank=r, world_size=world_size, drop_last=drop_last)
        for r in range(world_size)
    ]
    per_rank = [sampler.batches(1) for sampler in samplers]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batches) == len(s) for batches, s in zip(per_rank, samplers, strict=True))
    everything = np.concatenate([np.concatenate(b) for b in per_rank if b] or [np.empty(0, np.int64)])
    if drop_last:
        assert all(len(batch) == 4 for batches in per_rank for batch in batches)
        assert len(set(everything.tolist())) == len(everything)  # disjoint
        assert num_rows - len(everything) < world_size * 4  # at most one global batch dropped
    else:
        assert set(everything.tolist()) == set(range(num_rows))  # covering
        assert len(everything) - num_rows < world_size  # padding: fewer than world_size repeats
        if num_rows % world_size == 0:
            assert len(everything) == num_rows  # and then disjoint
