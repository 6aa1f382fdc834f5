"""Read a cache: validate the manifest against the shards, memory-map them, gather batches.

Each shard holds one record batch; each fixed-size-list column's child buffer is viewed as a numpy
array in place (`np.frombuffer` over the memory map: no copy, no Python object per row). The shards
are concatenated logically: global row `i` lives in shard `searchsorted(starts, i, "right") - 1`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vilbert.cache.checks import first_bad_row
from vilbert.cache.format import (
    TOKENIZER_NAME,
    Manifest,
    Normalization,
    normalization,
    numpy_column,
    read_manifest,
    sha256_file,
)
from vilbert.errors import CacheError

__all__ = ["CacheReader", "NUMERIC_COLUMNS"]

log = logging.getLogger(__name__)

NUMERIC_COLUMNS = ("pixels", "input_ids", "num_tokens", "label")
_MIXED_KEYS = ("tokenizer_fingerprint", "pixel_dtype", "image_size", "max_len", "has_labels", "normalization")


class _Shard:
    """One memory-mapped shard and zero-copy numpy views of its numeric columns."""

    def __init__(self, path: Path, manifest: Manifest, expected: pa.Schema, rows: int, size: int) -> None:
        if not path.is_file():
            raise CacheError(f"missing shard {path} (listed in the manifest)")
        actual = path.stat().st_size
        if actual != size:
            kind = "truncated" if actual < size else "has the wrong size"
            raise CacheError(
                f"shard {path} is {kind}: {actual} bytes on disk, the manifest says {size}; "
                "rebuild the cache or run `vilbert cache verify`"
            )
        # The file is closed once the batch is read: the mapping lives as long as the batch's
        # buffers, and a cache of thousands of shards holds no file descriptors.
        try:
            with pa.memory_map(str(path), "r") as source:
                reader = pa.ipc.open_file(source)
                batch = reader.get_batch(0) if reader.num_record_batches == 1 else None
        except (OSError, pa.ArrowInvalid) as err:
            raise CacheError(f"shard {path} is not a readable Arrow IPC file ({err})") from err
        _check_schema(path, reader.schema, expected)
        if batch is None or batch.num_rows != rows:
            found = "several record batches" if batch is None else f"{batch.num_rows} rows"
            raise CacheError(f"shard {path} holds {found}; the manifest says one batch of {rows} rows")
        self.path = path
        self.batch = batch
        self.views = {name: numpy_column(batch.column(name)) for name in NUMERIC_COLUMNS if name in batch.schema.names}
        size = manifest.image_size
        self.views["pixels"] = self.views["pixels"].reshape(rows, manifest.channels, size, size)


def _check_schema(path: Path, actual: pa.Schema, expected: pa.Schema) -> None:
    if actual.equals(expected, check_metadata=False):
        meta = actual.metadata or {}
        for key, value in (expected.metadata or {}).items():
            if meta.get(key) != value:
                what = key.decode().removeprefix("vilbert.")
                mixed = " (shards built with different tokenizers)" if what == "tokenizer_fingerprint" else ""
                raise CacheError(
                    f"shard {path} was built with a different {what}{mixed}: "
                    f"{(meta.get(key) or b'none').decode()} vs the manifest's {value.decode()}"
                )
        return
    raise CacheError(
        f"shard {path} has an unexpected schema: {actual.remove_metadata()} (expected {expected.remove_metadata()})"
    )


class CacheReader:
    """A validated, memory-mapped cache (or several caches of the same kind, concatenated).

    Opening checks what is cheap: manifest version, tokenizer file fingerprint, and for each shard
    its size, schema (and schema metadata) and row count. Full checksums are `verify_cache`'s job.
    Every gathered batch is range-checked (see `gather_located`): a shard corrupted in place, same
    size, raises `CacheError` naming the shard and row before the batch is handed out.

    Args:
        path: A cache directory, or a list of them read as one (they must agree on tokenizer,
            pixel dtype, image size, max_len, labels and normalization).
        num_labels: Labels must lie in `[0, num_labels)` (the classifier's classes); without it,
            only `>= 0` is checked.

    Raises:
        CacheError: not a cache, unknown format version, missing/truncated/foreign shard, or mixed
            caches.
    """

    def __init__(
        self, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, num_labels: int | None = None
    ) -> None:
        paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        if not paths:
            raise CacheError("CacheReader needs at least one cache directory")
        self.paths = tuple(paths)
        self.num_labels = num_labels
        self.manifests = tuple(read_manifest(p) for p in paths)
        self.manifest = self.manifests[0]
        """The first cache's manifest (all opened caches agree on everything but rows and split)."""
        _check_same_kind(paths, self.manifests)
        self._check_tokenizer_files()
        self._shards: list[_Shard] = []
        for directory, manifest in zip(paths, self.manifests, strict=True):
            schema = manifest.schema()
            for info in manifest.shards:
                self._shards.append(_Shard(directory / info.name, manifest, schema, info.rows, info.bytes))
        self._column_views = {name: [s.views[name] for s in self._shards] for name in self.numeric_columns}
        counts = np.array([len(s.batch) for s in self._shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        """Global index of each shard's first row (and the total at the end)."""

    # ------------------------------------------------------------------------------ metadata

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        where = ", ".join(str(p) for p in self.paths)
        return f"CacheReader({where}: {len(self)} rows, {len(self._shards)} shards, {self.pixel_dtype})"

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def pixel_dtype(self) -> str:
        return self.manifest.pixel_dtype

    @property
    def normalization(self) -> Normalization:
        return self.manifest.normalization

    @property
    def has_labels(self) -> bool:
        return self.manifest.has_labels

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest.tokenizer_fingerprint

    @property
    def shard_paths(self) -> tuple[Path, ...]:
        return tuple(s.path for s in self._shards)

    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` the captions were encoded with."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.paths[0] / TOKENIZER_NAME))

    def check_compatible(
        self,
        *,
        expected_normalization: Any = None,
        expected_tokenizer_fingerprint: str | None = None,
        expected_image_size: int | None = None,
        expected_max_len: int | None = None,
        expected_vocab_size: int | None = None,
    ) -> None:
        """Refuse a cache that does not match what the model expects.

        Normalization is checked only for float16 caches: uint8 pixels are normalized on the device
        with the model's own mean/std.

        Raises:
            CacheError: naming the mismatched property, both values, and how to fix it.
        """
        where = ", ".join(str(p) for p in self.paths)
        if expected_normalization is not None and self.pixel_dtype == "float16":
            want = normalization(expected_normalization)
            if not self.normalization.matches(want):
                raise CacheError(
                    f"cache {where} holds float16 pixels normalized with {self.normalization.describe()}, "
                    f"but the model expects {want.describe()}; rebuild the cache with --normalization "
                    f"{want.name} or with --pixel-dtype uint8 (normalized on the device)"
                )
        checks = (
            ("tokenizer fingerprint", self.tokenizer_fingerprint, expected_tokenizer_fingerprint),
            ("image size", self.image_size, expected_image_size),
            ("max_len", self.max_len, expected_max_len),
            ("vocab size", self.manifest.vocab_size, expected_vocab_size),
        )
        for what, have, want in checks:
            if want is not None and have != want:
                raise CacheError(
                    f"cache {where} was built with {what} {have!r}, but the model expects "
                    f"{want!r}; rebuild the cache to match (vilbert preprocess)"
                )

    # ------------------------------------------------------------------------------ columns

    def views(self, column: str) -> list[np.ndarray]:
        """Zero-copy, read-only numpy views of a numeric column, one per shard (pixels `[n,3,H,W]`)."""
        self._require(column)
        return [s.views[column] for s in self._shards]

    def torch_views(self, column: str) -> list[Any]:
        """`torch.from_numpy` of `views(column)`: zero-copy; never write to them (the map is read-only)."""
        import torch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return [torch.from_numpy(v) for v in self.views(column)]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices -> (shard index, row within shard)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"row {bad} out of range for a cache of {len(self)} rows")
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]

    def allocate(self, batch_size: int, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Empty numpy buffers shaped for `gather(..., out=...)` of `batch_size` rows."""
        first = self.manifests[0]
        shapes = {
            "pixels": ((first.channels, first.image_size, first.image_size), first.pixel_dtype),
            "input_ids": ((first.max_len,), np.int32),
            "num_tokens": ((), np.int32),
            "label": ((), np.int64),
        }
        names = columns or self.numeric_columns
        return {name: np.empty((batch_size, *shapes[name][0]), shapes[name][1]) for name in names}

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        return tuple(c for c in NUMERIC_COLUMNS if c != "label" or self.has_labels)

    def gather(
        self, indices: Sequence[int] | np.ndarray, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows `indices` (in that order) of every numeric column, copied once into `out`.

        Args:
            indices: Global row indices.
            out: Buffers from `allocate` (at least `len(indices)` rows); allocated when omitted.

        Returns:
            `{"pixels", "input_ids", "num_tokens", ["label"]}` arrays of `len(indices)` rows
            (views into `out` when given).
        """
        shard, local = self.locate(indices)
        return self.gather_located(shard, local, out)

    def gather_located(
        self,
        shard: np.ndarray,
        local: np.ndarray,
        out: dict[str, np.ndarray] | None = None,
        single_shard: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """`gather` for rows already located with `locate` (the loader locates a whole epoch at
        once); `single_shard` may be passed when known (all rows in `shard[0]`).

        The gathered rows are range-checked (`first_bad_row`) before they are returned.

        Raises:
            CacheError: a value no valid cache holds, naming the shard and row.
        """
        n = len(local)
        if out is None:
            out = self.allocate(n)
        elif len(next(iter(out.values()))) != n:
            out = {name: buffer[:n] for name, buffer in out.items()}
        if single_shard is None:
            single_shard = n > 0 and shard[0] == shard[-1] and bool((shard == shard[0]).all())
        if single_shard:
            views = self._shards[int(shard[0])].views
            for name, buffer in out.items():
                np.take(views[name], local, axis=0, out=buffer, mode="clip")
        else:
            self._gather_mixed(shard, local, out)
        bad = first_bad_row(out, self.manifest.vocab_size, self.manifest.max_len, self.num_labels)
        if bad is not None:
            position, what = bad
            s = int(shard[0] if single_shard else shard[position])
            self._refuse(s, int(local[position]), what)
        return out

    def _refuse(self, shard: int, row: int, what: str) -> None:
        path = self._shards[shard].path
        key = self._shards[shard].batch.column("key")[row].as_py()
        raise CacheError(
            f"shard {path} row {row} (key {key!r}): {what}; the shard is corrupt: `vilbert cache verify "
            f"{path.parent}` checks every shard, and `vilbert preprocess` rebuilds the cache"
        )

    def _gather_mixed(self, shard: np.ndarray, local: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Rows spread over several shards, copied once each, straight into `out`.

        Pixel rows (100-300 KB) are copied one by one. The small columns are gathered with one
        fancy index per shard when the batch spans few shards (`shard_window`, small caches), and
        row by row when it spans about one shard per row (a global shuffle of a large cache).
        """
        shards, rows = shard.tolist(), local.tolist()
        if "pixels" in out:
            buffer, views = out["pixels"], self._column_views["pixels"]
            for position, (s, row) in enumerate(zip(shards, rows, strict=True)):
                buffer[position] = views[s][row]
        small = [(out[name], self._column_views[name]) for name in out if name != "pixels"]
        order = np.argsort(shard, kind="stable")
        in_order = shard[order]
        cuts = (np.flatnonzero(in_order[1:] != in_order[:-1]) + 1).tolist()
        if len(cuts) + 1 > len(shards) // 4:
            for position, (s, row) in enumerate(zip(shards, rows, strict=True)):
                for buffer, views in small:
                    buffer[position] = views[s][row]
            return
        for start, stop in zip([0, *cuts], [*cuts, len(order)], strict=True):
            group = order[start:stop]
            s, wanted = int(in_order[start]), local[group]
            for buffer, views in small:
                buffer[group] = views[s][wanted]

    def keys(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Sample keys of `indices` (Python strings: not for the hot path)."""
        return self._strings("key", indices)

    def captions(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Captions of `indices` (Python strings: not for the hot path)."""
        self._require("caption")
        return self._strings("caption", indices)

    def _strings(self, column: str, indices: Sequence[int] | np.ndarray) -> list[str]:
        shard, local = self.locate(np.asarray(indices))
        return [
            self._shards[s].batch.column(column)[r].as_py() for s, r in zip(shard.tolist(), local.tolist(), strict=True)
        ]

    def _require(self, column: str) -> None:
        names = self._shards[0].batch.schema.names if self._shards else self.manifest.schema().names
        if column not in names:
            raise CacheError(f"cache {self.paths[0]} has no column {column!r}; columns: {', '.join(names)}")

    def _check_tokenizer_files(self) -> None:
        for directory, manifest in zip(self.paths, self.manifests, strict=True):
            file = directory / TOKENIZER_NAME
            if not file.is_file():
                raise CacheError(f"cache {directory} lacks {TOKENIZER_NAME} (listed in the manifest)")
            actual = sha256_file(file)
            if actual != manifest.tokenizer_fingerprint:
                raise CacheError(
                    f"{file} does not match the manifest's tokenizer fingerprint "
                    f"({actual} vs {manifest.tokenizer_fingerprint})"
                )


def _check_same_kind(paths: Sequence[Path], manifests: Sequence[Manifest]) -> None:
    first = manifests[0]
    for path, manifest in zip(paths[1:], manifests[1:], strict=True):
        for key in _MIXED_KEYS:
            a, b = getattr(first, key), getattr(manifest, key)
            if a != b:
                mixed = " (caches built with different tokenizers)" if key == "tokenizer_fingerprint" else ""
                raise CacheError(f"cannot read {paths[0]} and {path} together{mixed}: {key} {a!r} vs {b!r}")
