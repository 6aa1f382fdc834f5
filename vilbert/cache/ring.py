"""The loader's preallocated batch buffers, and an epoch located once.

A ring of slots, each holding one batch's numpy buffers (over pinned torch memory when the batch
goes on to CUDA). Slots live as long as the loader, so after the first epoch a batch costs no
allocation and no page fault. A slot is handed out again only when overwriting it is safe:

- CUDA: the non-blocking copy out of it has finished (its event has completed);
- CPU: the consumer no longer holds any tensor made from it. Each batch tensor is
  `torch.from_numpy` of a fresh numpy view of the slot's array, and each view holds a reference
  to that array; so the array's reference count is back to its idle value exactly when every
  tensor (and every view of one: they share the storage that holds the numpy view) is gone.
  A slot still in use is left to the consumer and a fresh one takes its place.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from vilbert.cache.reader import CacheReader
from vilbert.cache.sampler import EpochSampler

__all__ = ["Slot", "Ring", "EpochPlan"]


class Slot:
    """Buffers for one batch of every numeric column."""

    def __init__(self, reader: CacheReader, batch_size: int, pinned: bool) -> None:
        self.pinned: dict[str, torch.Tensor] = {}
        if pinned:
            for name, array in reader.allocate(0).items():
                dtype = torch.from_numpy(array).dtype
                self.pinned[name] = torch.empty((batch_size, *array.shape[1:]), dtype=dtype, pin_memory=True)
            self.arrays = {name: tensor.numpy() for name, tensor in self.pinned.items()}
        else:
            self.arrays = reader.allocate(batch_size)
        self.event: Any = None
        """CUDA event recorded after the copy out of this slot (pinned slots only)."""
        self._idle_refs = self._refs()

    def _refs(self) -> list[int]:
        return [sys.getrefcount(array) for array in self.arrays.values()]

    def in_use(self) -> bool:
        """True while a tensor made from this slot (or a view of one) is alive."""
        return self._refs() != self._idle_refs


class Ring:
    """`size` slots; batch `k` of a pass reserved at `base` uses slot `(base + k) % size`."""

    def __init__(self, reader: CacheReader, batch_size: int, size: int, pinned: bool) -> None:
        self.reader, self.batch_size, self.pinned = reader, batch_size, pinned
        self.slots: list[Slot | None] = [None] * size
        self.cursor = 0
        self.allocations = 0
        """Slots allocated so far: `size` when the consumer lets go of its batches in time."""

    def reserve(self, count: int) -> int:
        """Reserve `count` consecutive slot turns for one pass; returns its base."""
        base, self.cursor = self.cursor, self.cursor + count
        return base

    def acquire(self, turn: int) -> Slot:
        """The slot for `turn`, safe to overwrite (waiting for its CUDA copy if needed)."""
        position = turn % len(self.slots)
        slot = self.slots[position]
        if slot is not None and slot.event is not None:
            slot.event.synchronize()
        elif slot is not None and slot.in_use():
            slot = None  # the consumer kept that batch: it owns those buffers now
        if slot is None:
            slot = self.slots[position] = Slot(self.reader, self.batch_size, pinned=self.pinned)
            self.allocations += 1
        return slot


class EpochPlan:
    """The rest of an epoch, located once: per batch its indices, shards, rows, and whether it lies
    in a single shard (so the hot path does no per-batch `searchsorted`)."""

    def __init__(self, reader: CacheReader, sampler: EpochSampler) -> None:
        self.indices = sampler.remaining_indices()
        self.shard, self.local = reader.locate(self.indices)
        self.size = sampler.batch_size
        starts = np.arange(0, len(self.indices), self.size)
        if len(starts):
            lowest = np.minimum.reduceat(self.shard, starts)
            self.single = (lowest == np.maximum.reduceat(self.shard, starts)).tolist()
        else:
            self.single = []

    def __len__(self) -> int:
        return len(self.single)

    def batch(self, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        rows = slice(number * self.size, (number + 1) * self.size)
        return self.indices[rows], self.shard[rows], self.local[rows], self.single[number]
