"""Which rows each rank reads in which order: seeded per epoch, disjoint across ranks, resumable.

An epoch's order is a pure function of `(seed, epoch)` and the cache's shard boundaries, so every
rank computes the same permutation without communicating, and a resumed run recomputes it and
skips the `position` batches it had already consumed.

Equal batch counts on every rank (DDP needs them or it hangs):
- `drop_last=False`: the epoch order is padded by repeating its first rows until it divides by
  `world_size` (at most `world_size - 1` repeats, as `torch.utils.data.DistributedSampler` does);
  each rank's last batch may be short, by the same amount on every rank.
- `drop_last=True`: the order is cut to a multiple of `world_size * batch_size`; every batch is full
  and at most `world_size * batch_size - 1` rows are skipped this epoch (different ones each epoch).
Rank `r` takes every `world_size`-th row of the order starting at `r`, so ranks are disjoint and,
padding aside, cover the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vilbert.errors import CheckpointError, UsageError

__all__ = ["EpochSampler"]

_STATE_KEYS = ("num_rows", "batch_size", "world_size", "rank", "seed", "shuffle", "drop_last", "shard_window")


class EpochSampler:
    """Batches of global row indices for one rank.

    Args:
        num_rows: Rows in the cache.
        batch_size: Rows per batch on each rank.
        shuffle: Permute rows each epoch (seeded by `(seed, epoch)`); otherwise row order.
        seed: Seed shared by all ranks.
        drop_last: See the module docstring.
        rank: This rank, `0 <= rank < world_size`.
        world_size: Number of ranks.
        shard_starts: First global row of each shard plus the total (`CacheReader.starts`); needed
            for `shard_window`.
        shard_window: `None` for a global shuffle; `k` to shuffle the shard order, then rows within
            windows of `k` consecutive shards (locality for caches larger than the page cache).
    """

    def __init__(
        self,
        *,
        num_rows: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shard_starts: np.ndarray | None = None,
        shard_window: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise UsageError(f"batch_size must be > 0, got {batch_size}")
        if seed < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise UsageError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if shard_window is not None and (shard_window <= 0 or shard_starts is None):
            raise UsageError(f"shard_window must be > 0 and needs shard_starts, got {shard_window}")
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.shard_window = shard_window
        self.shard_starts = None if shard_starts is None else np.asarray(shard_starts, dtype=np.int64)
        self.epoch = 0
        self.position = 0
        """Batches of the current epoch already handed to the consumer."""

    # ------------------------------------------------------------------------------ sizes

    def rows_per_rank(self) -> int:
        if self.drop_last:
            return self.num_rows // (self.world_size * self.batch_size) * self.batch_size
        return -(-self.num_rows // self.world_size) if self.num_rows else 0

    def __len__(self) -> int:
        rows = self.rows_per_rank()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    # ------------------------------------------------------------------------------ order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All rows of `epoch` in the order ranks share out (before padding or cutting)."""
        dtype = np.int64
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=dtype)
        rng = np.random.default_rng([self.seed, epoch])
        if self.shard_window is None:
            return rng.permutation(self.num_rows).astype(dtype, copy=False)
        starts = self.shard_starts
        shards = rng.permutation(len(starts) - 1)
        pieces = []
        for first in range(0, len(shards), self.shard_window):
            rows = np.concatenate(
                [np.arange(starts[s], starts[s + 1], dtype=dtype) for s in shards[first : first + self.shard_window]]
            )
            pieces.append(rows[rng.permutation(len(rows))])
        return np.concatenate(pieces) if pieces else np.empty(0, dtype)

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's rows of `epoch`, in order (padded or cut so all ranks have the same count)."""
        order = self.epoch_order(epoch)
        total = self.rows_per_rank() * self.world_size
        if total > len(order):  # pad by repeating the start of the order (wrapping if tiny)
            order = np.resize(order, total)
        return order[:total][self.rank :: self.world_size]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch` (the last may be short unless `drop_last`)."""
        indices = self.rank_indices(epoch)
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)][: len(self)]

    def remaining_batches(self) -> list[np.ndarray]:
        """The current epoch's batches from `position` on."""
        return self.batches(self.epoch)[self.position :]

    def remaining_indices(self) -> np.ndarray:
        """The rows of `remaining_batches()` in one array: batch `k` is `[k * batch_size:][:batch_size]`."""
        return self.rank_indices(self.epoch)[self.position * self.batch_size : len(self) * self.batch_size]

    # ------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Select `epoch`; the position resets only when the epoch changes (so resume survives)."""
        if epoch < 0:
            raise UsageError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self) -> None:
        self.position += 1

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        state = {key: getattr(self, key) for key in _STATE_KEYS}
        state.update(epoch=self.epoch, position=self.position)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `epoch` and `position`.

        Raises:
            CheckpointError: the state was saved with another cache size, batch size, world size,
                seed or shuffle mode, so the remaining batches would not be the ones it expects.
        """
        for key in _STATE_KEYS:
            if key in state and key != "rank" and state[key] != getattr(self, key):
                raise CheckpointError(
                    f"sampler state was saved with {key}={state[key]!r} but this loader "
                    f"has {key}={getattr(self, key)!r}; resume with the same settings"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise CheckpointError(f"sampler position {position} outside [0, {len(self)}] batches per epoch")
        self.epoch, self.position = int(state["epoch"]), position
