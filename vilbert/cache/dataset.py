"""`CacheDataset`: a cache split as a `torch.utils.data.Dataset`, for loops that are not ours (a plain
`DataLoader`, Lightning, the Hugging Face `Trainer`).

    dataset[i]          -> {"pixels" (3,H,W), "input_ids" (L,), "num_tokens" (), ["label" ()]}: zero-copy,
                           read-only views into the memory-mapped shards
    dataset[[i, j, k]]  -> the same keys with a leading batch dimension: one vectorized gather (one copy)

A `DataLoader(dataset, batch_size=B)` collates single rows (one copy, into the batch). The faster way hands
whole index lists to the dataset: `DataLoader(dataset, batch_size=None, sampler=BatchSampler(...))` gathers
each batch with one vectorized index, as our own `BatchLoader` does. Pixels stay as stored (`uint8`, or
`float16` already normalized with `normalization`); `input_ids` are `int32`, padded to `max_len`.

Every row handed out is range-checked as `CacheReader.gather` checks a batch (token ids, lengths, labels,
finite pixels). The dataset pickles as its paths, so `num_workers > 0` reopens the maps in each worker;
with memory maps the main process is usually as fast (`vilbert/cache/README.md`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vilbert.cache.checks import first_bad_row
from vilbert.cache.format import Normalization
from vilbert.cache.reader import CacheReader

__all__ = ["CacheDataset"]


class CacheDataset(Dataset):
    """A cache directory (one split, or several read as one) as a map-style torch dataset.

    Args:
        path: A cache directory, e.g. `data/cache/cc/train`, or a list of caches of the same kind.
        num_labels: Labels must lie in `[0, num_labels)`; without it only `>= 0` is checked.

    Raises:
        CacheError: Not a cache, or a shard that is missing, truncated or foreign (when opened).
    """

    def __init__(
        self, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, num_labels: int | None = None
    ) -> None:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.paths = tuple(Path(p) for p in paths)
        self.num_labels = num_labels
        self._reader: CacheReader | None = None
        self._views: dict[str, list[torch.Tensor]] = {}
        self.reader  # noqa: B018 - open now: a bad path fails here, not in the first worker

    @property
    def reader(self) -> CacheReader:
        """The underlying `CacheReader` (opened on first use in each process)."""
        if self._reader is None:
            self._reader = CacheReader(list(self.paths), num_labels=self.num_labels)
            self._views = {name: self._reader.torch_views(name) for name in self._reader.numeric_columns}
        return self._reader

    @property
    def normalization(self) -> Normalization:
        """The mean/std a `float16` cache was normalized with (a `uint8` cache: the one to apply)."""
        return self.reader.normalization

    @property
    def pixel_dtype(self) -> str:
        return self.reader.pixel_dtype

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int | Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(index, (int, np.integer)):
            return self._row(int(index))
        indices = np.asarray(index.tolist() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        if indices.ndim == 0:  # a 0-d tensor or array
            return self._row(int(indices))
        if indices.ndim != 1:
            raise TypeError(f"CacheDataset takes a row index or a 1-d list of them, not shape {indices.shape}")
        batch = self.reader.gather(indices)  # range-checked; raises CacheError naming shard and row
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    def _row(self, index: int) -> dict[str, torch.Tensor]:
        reader = self.reader
        if index < 0:
            index += len(reader)
        shard, local = reader.locate(np.array([index]))  # IndexError out of range, as a Sequence should
        s, row = int(shard[0]), int(local[0])
        views = {name: columns[s][row] for name, columns in self._views.items()}
        as_batch = {name: view.numpy()[None] for name, view in views.items()}
        if first_bad_row(as_batch, reader.manifest.vocab_size, reader.manifest.max_len, reader.num_labels):
            reader.gather(np.array([index]))  # raises the reader's CacheError for this row
        return views

    def keys(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Sample keys of `indices` (Python strings: not for the hot path)."""
        return self.reader.keys(indices)

    def captions(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Captions of `indices` (Python strings: not for the hot path)."""
        return self.reader.captions(indices)

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "num_labels": self.num_labels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self.num_labels = state["paths"], state["num_labels"]
        self._reader, self._views = None, {}

    def __repr__(self) -> str:
        return f"CacheDataset({self.reader!r})"
