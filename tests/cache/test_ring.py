"""The loader's preallocated batch buffers (`vilbert/cache/ring.py`)."""

from __future__ import annotations

import torch

from vilbert.cache import BatchLoader, CacheReader


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
