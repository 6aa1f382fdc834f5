"""Batches from a cache: a seeded, rank-aware, resumable sampler and a prefetching loader.

```
EpochSampler (seed, epoch) -> permutation -> this rank's slice -> batches of indices
      |
BatchLoader thread:  indices -> reader.gather(out=ring slot) -> [CUDA: H2D copy on a side stream]
      |                                                              |
      +--> queue (at most `prefetch` batches ready) --> consumer: Batch(pixels, input_ids, ...)
```

No worker processes: the gather is a few large memcpys that release the GIL, so one thread keeps
up (worker processes would pay for pickling and IPC, 15x slower on 2 cores; DESIGN.md section 4).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vilbert.cache.reader import CacheReader
from vilbert.cache.sampler import EpochSampler
from vilbert.errors import UsageError

__all__ = ["Batch", "BatchLoader"]

log = logging.getLogger(__name__)

_POLL_S = 0.1


@dataclass(frozen=True)
class Batch:
    """One batch, as torch tensors on the loader's device.

    `pixels` `[B,3,H,W]` float16 (normalized) or uint8 (raw, as stored); `input_ids` `[B,L]` int32;
    `num_tokens` `[B]` int32; `labels` `[B]` int64 or None; `indices` `[B]` int64 global row indices
    (`reader.keys(batch.indices)` gives the sample keys; CPU tensor).
    """

    pixels: torch.Tensor
    input_ids: torch.Tensor
    num_tokens: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """This batch on another device (`indices` stay on the CPU)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            pixels=move(self.pixels),
            input_ids=move(self.input_ids),
            num_tokens=move(self.num_tokens),
            labels=move(self.labels),
        )


class BatchLoader:
    """Iterate a cache in batches of torch tensors on `device`.

    Args:
        reader: The cache.
        batch_size: Rows per batch on this rank.
        shuffle: A new seeded permutation each epoch; otherwise row order.
        seed: Seed of the permutations (with the epoch).
        drop_last: Drop the incomplete last batch; see `EpochSampler` for how ranks stay equal.
        rank: This process's DDP rank.
        world_size: Number of DDP ranks.
        device: Where batches are delivered; CUDA batches are copied from pinned buffers with
            `non_blocking=True` on a side stream.
        prefetch: Batches kept ready by the background thread (0: gather in the caller's thread).
        shard_window: `None` shuffles globally; `k` shuffles shard order, then rows within windows
            of `k` consecutive shards, so only `k` shards are hot at a time (caches larger than RAM).

    Memory: batches are gathered into a ring of `prefetch + 3` preallocated slots, so nothing is
    allocated per batch and nothing grows with the cache. A slot is never overwritten while its
    batch is in use: on CPU the loader yields tensors over the slot and reuses it only once the
    consumer holds no tensor (or view) made from it any more, else it allocates a fresh slot and
    the consumer keeps the old one; on CUDA it yields device tensors and reuses a pinned slot once
    the GPU has finished the non-blocking copy out of it.
    """

    def __init__(
        self,
        reader: CacheReader,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        shard_window: int | None = None,
    ) -> None:
        if prefetch < 0:
            raise UsageError(f"prefetch must be >= 0, got {prefetch}")
        self.reader = reader
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.sampler = EpochSampler(
            num_rows=len(reader),
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            shard_starts=reader.starts,
            shard_window=shard_window,
        )
        self._ring_cache: _Ring | None = None
        self._stream: Any = None
        self._iterator: weakref.ref | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def slot_allocations(self) -> int:
        """Ring slots allocated so far: `prefetch + 3` when every batch was released in time; more
        when the consumer kept batches (those buffers became the consumer's)."""
        return self._ring_cache.allocations if self._ring_cache else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; keeps the position when `epoch` is the current one (resume)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """`{"epoch", "position", ...}`: position counts batches handed to the consumer."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch. One live iterator per loader: a new one closes the last."""
        previous = self._iterator() if self._iterator else None
        if previous is not None:
            previous.close()
        iterator = _BatchIterator(self)
        self._iterator = weakref.ref(iterator)
        return iterator

    def _ring(self) -> _Ring:
        if self._ring_cache is None:
            # In use at once: `prefetch` queued, one produced and waiting to be queued, the
            # consumer's current batch and, until its loop variable is rebound, its previous one.
            size = self.prefetch + 3
            self._ring_cache = _Ring(self.reader, self.batch_size, size, self.device.type == "cuda")
        return self._ring_cache

    def _copy_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream


class _Stop(Exception):
    pass


class _Slot:
    """One ring slot: numpy buffers for a batch (over pinned torch memory when feeding CUDA)."""

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
        self._idle_refs = self._refs()

    def _refs(self) -> list[int]:
        return [sys.getrefcount(array) for array in self.arrays.values()]

    def in_use(self) -> bool:
        """True while the consumer still holds a tensor (or a view of one) made from this slot:
        each such tensor keeps a numpy view alive, and each view holds a reference to its base."""
        return self._refs() != self._idle_refs


class _Ring:
    """`size` slots handed out round-robin, kept across epochs (no page faults after the first).

    A slot comes back only when it is safe to overwrite: its CUDA copy has finished, or (CPU) the
    consumer no longer holds its tensors; otherwise a fresh slot takes its place.
    """

    def __init__(self, reader: CacheReader, batch_size: int, size: int, pinned: bool) -> None:
        self.reader, self.batch_size, self.pinned = reader, batch_size, pinned
        self.slots: list[_Slot | None] = [None] * size
        self.cursor = 0
        self.allocations = 0
        """Slots allocated so far: `size` when the consumer lets go of its batches in time."""

    def acquire(self) -> _Slot:
        position = self.cursor % len(self.slots)
        self.cursor += 1
        slot = self.slots[position]
        if slot is not None and slot.event is not None:
            slot.event.synchronize()  # the GPU has finished copying out of this slot
        elif slot is not None and slot.in_use():
            slot = None  # the consumer kept that batch: it owns those buffers now
        if slot is None:
            slot = self.slots[position] = _Slot(self.reader, self.batch_size, pinned=self.pinned)
            self.allocations += 1
        return slot


class _EpochPlan:
    """The rest of an epoch, located once: per batch its indices, shards, rows and whether it lies
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


class _Producer:
    """The background thread's state; holds no reference to the iterator (so abandoning the
    iterator lets it be collected, which stops the thread)."""

    def __init__(self, loader: BatchLoader, plan: _EpochPlan) -> None:
        self.reader = loader.reader
        self.batch_size = loader.batch_size
        self.device = loader.device
        self.plan = plan
        self.stop = threading.Event()
        self.ready: queue.Queue = queue.Queue(maxsize=max(1, loader.prefetch))
        self.cuda = loader.device.type == "cuda"
        self.stream = loader._copy_stream() if self.cuda else None
        self.ring = loader._ring()

    def produce(self, number: int) -> tuple[Batch, Any]:
        """Batch `number`, and the CUDA event after which its device tensors are ready (or None)."""
        indices, shard, local, single = self.plan.batch(number)
        n = len(indices)
        slot = self.ring.acquire()
        self.reader.gather_located(shard, local, out=slot.arrays, single_shard=single)
        if self.cuda:
            host = {name: tensor[:n] for name, tensor in slot.pinned.items()}
        else:
            host = {name: torch.from_numpy(array[:n]) for name, array in slot.arrays.items()}
        batch = Batch(
            pixels=host["pixels"],
            input_ids=host["input_ids"],
            num_tokens=host["num_tokens"],
            labels=host.get("label"),
            indices=torch.from_numpy(indices.astype(np.int64, copy=False)),
        )
        if not self.cuda:
            return batch, None
        with torch.cuda.stream(self.stream):
            moved = batch.to(self.device, non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(self.stream)
        return moved, slot.event

    def run(self) -> None:
        try:
            for number in range(len(self.plan)):
                if self.stop.is_set():
                    return
                self._put(("batch", self.produce(number)))
            self._put(("end", None))
        except _Stop:
            return
        except BaseException as err:  # handed to the consumer, which re-raises it
            try:
                self._put(("error", err))
            except _Stop:
                return

    def _put(self, item: tuple[str, Any]) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                self.ready.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue


class _BatchIterator:
    """One pass over the rest of the current epoch."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.sampler = loader.sampler
        self.plan = _EpochPlan(loader.reader, self.sampler)
        self.producer = _Producer(loader, self.plan)
        self.served = 0
        self.thread: threading.Thread | None = None
        if loader.prefetch > 0 and len(self.plan):
            self.thread = threading.Thread(target=self.producer.run, name="vilbert-batch-loader", daemon=True)
            self.thread.start()
            weakref.finalize(self, _shutdown, self.producer, self.thread)

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.served >= len(self.plan):
            self._finish_epoch()
            raise StopIteration
        batch, event = self._next_batch()
        if event is not None:
            stream = torch.cuda.current_stream(self.loader.device)
            stream.wait_event(event)
            for tensor in (batch.pixels, batch.input_ids, batch.num_tokens, batch.labels):
                if tensor is not None:
                    tensor.record_stream(stream)
        self.served += 1
        self.sampler.advance()
        return batch

    def _next_batch(self) -> tuple[Batch, Any]:
        if self.thread is None:
            return self.producer.produce(self.served)
        kind, value = self.producer.ready.get()
        if kind == "error":
            self.close()
            raise value
        assert kind == "batch", kind
        return value

    def _finish_epoch(self) -> None:
        if self.sampler.position >= len(self.sampler):
            self.sampler.next_epoch()
        self.close()

    def close(self) -> None:
        """Stop the background thread (also done when the iterator is garbage-collected)."""
        if self.thread is not None:
            _shutdown(self.producer, self.thread)
            self.thread = None


def _shutdown(producer: _Producer, thread: threading.Thread) -> None:
    producer.stop.set()
    while True:  # unblock a producer waiting on a full queue
        try:
            producer.ready.get_nowait()
        except queue.Empty:
            break
    if thread is not threading.current_thread():
        thread.join(timeout=10)
