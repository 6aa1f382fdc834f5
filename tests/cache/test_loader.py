"""BatchLoader: batches match the cache, exact resume of its position, prefetch and thread hygiene."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from vilbert.cache import BatchLoader, CacheReader
from vilbert.errors import CheckpointError

from .conftest import build_cache


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
