"""Batches from a cache: a seeded, rank-aware, resumable sampler and a prefetching loader.

```
EpochSampler (seed, epoch) -> permutation -> this rank's slice -> EpochPlan (located once)
      |
      v                 claims batch k <= delivered + prefetch, in order
 background thread --+--> reader.gather_located(out=ring slot) --> [CUDA: H2D on a side stream]
 consumer, if its    |                                                      |
 batch is not ready -+            ready[k] <--------------------------------+
      |
 next(iterator) -> Batch(pixels, input_ids, num_tokens, labels, indices), strictly in order
```

No worker processes: the gather is a few large memcpys that release the GIL, so one thread keeps
up (worker processes would pay for pickling and IPC, 15x slower on 2 cores; DESIGN.md section 4).
A consumer that would wait for its batch produces the next unclaimed one itself instead, so no
thread idles while the loop is data-bound.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vilbert.cache.reader import CacheReader
from vilbert.cache.ring import EpochPlan, Ring
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
        prefetch: Batches produced ahead of the consumer by a background thread (0: no thread,
            every batch is gathered in the caller's thread).
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
        self._ring_cache: Ring | None = None
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

    def _ring(self) -> Ring:
        if self._ring_cache is None:
            # In use at once: the batch the consumer asks for and `prefetch` beyond it, its
            # current batch and, until its loop variable is rebound, its previous one.
            size = self.prefetch + 3
            self._ring_cache = Ring(self.reader, self.batch_size, size, self.device.type == "cuda")
        return self._ring_cache

    def _copy_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream


class _Pipeline:
    """Produces one epoch plan's batches in order, sharing the work between the background thread
    and the consumer: a consumer that would wait produces a batch itself instead (with
    `prefetch=0` it produces every batch). At most `prefetch` batches are claimed beyond the one
    the consumer asks for. Holds no reference to the iterator, so abandoning the iterator lets it
    be collected, which stops the thread.
    """

    def __init__(self, loader: BatchLoader, plan: EpochPlan) -> None:
        self.reader, self.plan, self.ahead = loader.reader, plan, loader.prefetch
        self.device = loader.device
        self.cuda = loader.device.type == "cuda"
        self.stream = loader._copy_stream() if self.cuda else None
        self.ring = loader._ring()
        self.base = self.ring.reserve(len(plan))
        self.cond = threading.Condition()
        self.claimed = 0
        self.delivered = 0
        self.ready: dict[int, tuple[str, Any]] = {}
        self.stopped = False

    def next(self) -> tuple[Batch, Any]:
        """The next batch in order (and its CUDA event or None); re-raises a producer's error."""
        number = self.delivered
        while True:
            with self.cond:
                if number in self.ready:
                    kind, value = self.ready.pop(number)
                    self.delivered += 1
                    self.cond.notify_all()
                    break
                claim = self._claim()
                if claim is None:  # the thread is producing it: wait
                    self.cond.wait(_POLL_S)
                    continue
            self._produce_into_ready(claim)
        if kind == "error":
            raise value
        return value

    def run(self) -> None:
        """The background thread: claim and produce batches until done or stopped."""
        while True:
            with self.cond:
                claim = self._claim()
                while claim is None and not self.stopped and self.claimed < len(self.plan):
                    self.cond.wait(_POLL_S)
                    claim = self._claim()
                if claim is None or self.stopped:
                    return
            self._produce_into_ready(claim)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _claim(self) -> int | None:
        """The next unclaimed batch if it is within reach (call with `cond` held)."""
        number = self.claimed
        if self.stopped or number >= len(self.plan) or number > self.delivered + self.ahead:
            return None
        self.claimed += 1
        return number

    def _produce_into_ready(self, number: int) -> None:
        try:
            item: tuple[str, Any] = ("batch", self._produce(number))
        except BaseException as err:  # handed to the consumer, in order
            item = ("error", err)
        with self.cond:
            self.ready[number] = item
            self.stopped = self.stopped or item[0] == "error"
            self.cond.notify_all()

    def _produce(self, number: int) -> tuple[Batch, Any]:
        indices, shard, local, single = self.plan.batch(number)
        n = len(indices)
        slot = self.ring.acquire(self.base + number)
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


class _BatchIterator:
    """One pass over the rest of the current epoch."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.sampler = loader.sampler
        self.pipeline = _Pipeline(loader, EpochPlan(loader.reader, self.sampler))
        self.thread: threading.Thread | None = None
        if loader.prefetch > 0 and len(self.pipeline.plan) > 1:
            self.thread = threading.Thread(target=self.pipeline.run, name="vilbert-batch-loader", daemon=True)
            self.thread.start()
            weakref.finalize(self, _shutdown, self.pipeline, self.thread)

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.pipeline.delivered >= len(self.pipeline.plan):
            self._finish_epoch()
            raise StopIteration
        try:
            batch, event = self.pipeline.next()
        except BaseException:
            self.close()
            raise
        if event is not None:
            stream = torch.cuda.current_stream(self.loader.device)
            stream.wait_event(event)
            for tensor in (batch.pixels, batch.input_ids, batch.num_tokens, batch.labels):
                if tensor is not None:
                    tensor.record_stream(stream)
        self.sampler.advance()
        return batch

    def _finish_epoch(self) -> None:
        if self.sampler.position >= len(self.sampler):
            self.sampler.next_epoch()
        self.close()

    def close(self) -> None:
        """Stop the background thread (also done when the iterator is garbage-collected)."""
        if self.thread is not None:
            _shutdown(self.pipeline, self.thread)
            self.thread = None


def _shutdown(pipeline: _Pipeline, thread: threading.Thread) -> None:
    pipeline.stop()
    if thread is not threading.current_thread():
        thread.join(timeout=10)
