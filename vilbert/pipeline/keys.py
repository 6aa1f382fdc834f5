"""Which keys a preprocess run has used, per split, so that a key is never used twice in a cache.

Kept as 64-bit hashes of `split + NUL + key` (8 bytes a key: ~100 MB for CC12M's 12M rows, where a
Python set of the strings would take over a gigabyte): the newest in a small set, the rest in
sorted numpy runs merged like a binary counter, so adding a key costs one `searchsorted` per run,
O(log n) runs. Two distinct keys share a hash with odds about n^2 / 2^65 (1e-6 at 12M keys).
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["KeyIndex"]

_PENDING = 4096


class KeyIndex:
    """A set of (split, key) pairs that answers "seen before?" as it grows."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._pending) + sum(len(r) for r in self._runs)

    def add(self, split: str, key: str) -> bool:
        """Record the pair; False when it was recorded before."""
        value = int.from_bytes(hashlib.blake2b(f"{split}\0{key}".encode(), digest_size=8).digest(), "little")
        if value in self._pending:
            return False
        probe = np.uint64(value)
        for run in self._runs:
            at = int(np.searchsorted(run, probe))
            if at < len(run) and run[at] == probe:
                return False
        self._pending.add(value)
        if len(self._pending) >= _PENDING:
            self._flush()
        return True

    def _flush(self) -> None:
        run = np.sort(np.fromiter(self._pending, dtype=np.uint64, count=len(self._pending)))
        self._pending.clear()
        # Merge while the previous run is no more than twice as long: O(log n) runs, each value
        # merged O(log n) times.
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate([self._runs.pop(), run]), kind="stable")
        self._runs.append(run)
