"""EpochSampler and BatchLoader: permutations, rank slices, exact resume, thread hygiene."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vilbert.cache import BatchLoader, CacheReader, EpochSampler
from vilbert.errors import CheckpointError

from .conftest import build_cache


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


def test_loader_batches_match_the_cache(cache_f16):
    path, rows = cache_f16
    loader = BatchLoader(CacheReader(path), batch_size=6, seed=0)
    assert len(loader) == 4
    batches = list(loader)  # the consumer keeps every batch: none may be overwritten later
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    seen = torch.cat([b.indices for b in batches]).numpy()
    assert sorted(seen.tolist()) == list(range(20))
    for batch in batches:
        idx = batch.indices.numpy()
        assert batch.pixels.dtype == torch.float16 and batch.pixels.shape[1:] == (3, 16, 16)
        assert batch.pixels.numpy().tobytes() == rows["pixels"][idx].tobytes()
        assert torch.equal(batch.input_ids, torch.from_numpy(rows["input_ids"][idx]))
        assert torch.equal(batch.num_tokens, torch.from_numpy(rows["num_tokens"][idx]))
        assert torch.equal(batch.labels, torch.from_numpy(rows["labels"][idx]))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_ring_slots_are_reused_only_when_released(cache_f16):
    reader = CacheReader(cache_f16[0])
    loader = BatchLoader(reader, 2, prefetch=2)  # 10 batches per epoch, a ring of 5 slots
    for _ in range(3):
        for batch in loader:
            assert len(batch) == 2
    assert loader.slot_allocations == 5
    del batch
    kept = [batch for batch in loader]  # the consumer keeps all 10: none may be overwritten
    views = [batch.pixels[:1] for batch in loader]  # a view alone keeps its slot too
    # Pass 4 reuses the 5 free slots and allocates 5; pass 5 finds every slot held: 10 more.
    assert loader.slot_allocations == 5 + 5 + 10
    for batch in kept:
        assert torch.equal(batch.pixels, torch.from_numpy(reader.gather(batch.indices.numpy())["pixels"]))
    assert all(view.shape == (1, 3, 16, 16) for view in views)


def test_an_empty_cache_loads_nothing(tmp_path):
    from vilbert.cache import verify_cache

    from .conftest import new_writer

    with new_writer(tmp_path / "c"):
        pass
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 0 and reader.num_shards == 0
    loader = BatchLoader(reader, 4)
    assert len(loader) == 0 and list(loader) == []
    assert verify_cache(tmp_path / "c").ok


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_depth_does_not_change_the_batches(cache_u8, prefetch):
    reader = CacheReader(cache_u8[0])
    reference = [b.indices.tolist() for b in BatchLoader(reader, 3, seed=5, prefetch=2)]
    got = list(BatchLoader(reader, 3, seed=5, prefetch=prefetch))
    assert [b.indices.tolist() for b in got] == reference
    for batch in got:
        assert torch.equal(batch.pixels, torch.from_numpy(reader.gather(batch.indices.numpy())["pixels"]))


def run_epochs(loader: BatchLoader, epochs: int) -> list[list[int]]:
    seen = []
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        seen += [batch.indices.tolist() for batch in loader]
    return seen


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 9])
def test_resume_yields_exactly_the_remaining_batches(cache_f16, stop_after):
    reader = CacheReader(cache_f16[0])
    reference = run_epochs(BatchLoader(reader, 6, seed=7, world_size=2, rank=1), 3)
    loader = BatchLoader(reader, 6, seed=7, world_size=2, rank=1)
    consumed = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        if len(consumed) == stop_after:
            break
        for batch in loader:  # a checkpoint is saved after the step that used `batch`
            consumed.append(batch.indices.tolist())
            if len(consumed) == stop_after:
                break
        if len(consumed) == stop_after:
            break
    state = loader.state_dict()
    del loader
    resumed = BatchLoader(reader, 6, seed=7, world_size=2, rank=1)
    resumed.load_state_dict(state)
    assert consumed + run_epochs(resumed, 3) == reference


def test_load_state_dict_refuses_other_settings(cache_f16):
    reader = CacheReader(cache_f16[0])
    state = BatchLoader(reader, 6, seed=7).state_dict()
    with pytest.raises(CheckpointError, match="saved with batch_size=6 but this loader has batch_size=4"):
        BatchLoader(reader, 4, seed=7).load_state_dict(state)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vilbert-batch-loader" and t.is_alive()]


def wait_for_no_loader_threads(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while loader_threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return not loader_threads()


def test_an_abandoned_iterator_stops_its_thread(cache_f16):
    loader = BatchLoader(CacheReader(cache_f16[0]), 2, prefetch=2)
    iterator = iter(loader)
    next(iterator)
    assert loader_threads()
    del iterator
    assert wait_for_no_loader_threads()
    for _ in loader:  # breaking out of a for loop abandons the iterator as well
        break
    assert wait_for_no_loader_threads()
    assert loader.state_dict()["position"] == 2


def test_errors_in_the_background_thread_reach_the_consumer(cache_f16, monkeypatch):
    reader = CacheReader(cache_f16[0])

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(reader, "gather_located", broken)
    with pytest.raises(OSError, match="disk on fire"):
        next(iter(BatchLoader(reader, 4)))
    assert wait_for_no_loader_threads()


def test_the_interpreter_exits_with_a_live_iterator(cache_f16):
    script = textwrap.dedent(f"""
        from vilbert.cache import BatchLoader, CacheReader
        it = iter(BatchLoader(CacheReader({str(cache_f16[0])!r}), 1, prefetch=1))
        next(it)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_the_cache(tmp_path):
    rows = build_cache(Path(tmp_path) / "c", n=20, dtype="uint8")
    loader = BatchLoader(CacheReader(tmp_path / "c"), 3, seed=1, device="cuda", prefetch=2)
    batches = list(loader)
    torch.cuda.synchronize()
    for batch in batches:
        assert batch.pixels.is_cuda and batch.labels.is_cuda and not batch.indices.is_cuda
        idx = batch.indices.numpy()
        assert torch.equal(batch.pixels.cpu(), torch.from_numpy(rows["pixels"][idx]))
        assert torch.equal(batch.input_ids.cpu(), torch.from_numpy(rows["input_ids"][idx]))
