"""Write a cache: batches of numpy arrays in, Arrow IPC shards and a manifest out.

```
CACHE_DIR/
  _tokenizer.json          the tokenizer the captions were encoded with (fingerprint in manifest)
  shard-00000.arrow        Arrow IPC file, uncompressed, ONE record batch of rows_per_shard rows:
  shard-00001.arrow          key        string
  ...                        pixels     fixed_size_list<float16|uint8>[3*H*W]   (CHW, row-major)
  shard-NNNNN.arrow          input_ids  fixed_size_list<int32>[max_len]         (padded with pad id)
                             num_tokens int32
                             label      int64                                   (if has_labels)
                             caption    string                                  (if has_captions)
  _manifest.json           written LAST, atomically: version, shards (name, rows, bytes, sha256),
                           image size/layout, pixel dtype, normalization, tokenizer fingerprint, ...

while building:            .shard-NNNNN.arrow.tmp (renamed when complete and fsynced)
                           .progress.json (completed shards, for mode="resume"; removed at the end)
                           .lock (flock held by the one writer; removed at the end)
```

Rows per shard are derived from `target_shard_bytes` and the row size only, and a shard is one
record batch whatever the producer's batch sizes, so the same rows in the same order give
byte-identical shards. The manifest's `created_at` is the only timestamp. The side files start with
`_` or `.`, which Arrow dataset readers skip: the directory opens as a dataset of its shards.

A shard's first pixel value sits at a multiple of 4,096 bytes in the file (padding in the record
batch's metadata), so its pixel rows go to the disk straight from memory where the file system
takes it (`_shard_file`: `O_DIRECT`, else the page cache, the same bytes). That offset is fixed
before the shard's first row arrives (`_pixel_room`: room for the schema and the batch's header and
keys of up to 60 bytes a row), so the rows go to the disk as they come, while the shard fills; a
shard whose keys outgrow the room puts its pixels at the next multiple of 4,096 and is written
whole when complete.

A full shard is hashed on one thread while it is written on another; its fsync, rename and
progress record run on a commit thread while the next shard fills (at most one waits), and its
pages then leave the page cache, so the next shard reuses them instead of taking fresh memory.

Pixels are the bulk of a row (301 KB in float16 at 224x224). `write` copies them into the shard's
buffer, unless the caller lends them (`release=`): then the shard keeps views of the caller's
arrays, the file and the checksum read them where they are, and `release` runs once the rows are in
a written shard (or copied by `detach`, when the caller needs its memory back sooner). The Arrow
file is the same byte for byte: the writer lays the record batch out around a placeholder of the
pixels' size and writes the lent pieces in its place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from vilbert.cache._shard_file import PIXEL_ALIGNMENT, PixelStream, ShardFiles
from vilbert.cache.format import (
    CHANNELS,
    MANIFEST_NAME,
    SETTINGS_KEYS,
    TOKENIZER_NAME,
    Manifest,
    ShardInfo,
    aligned_empty,
    arrow_array,
    arrow_strings,
    default_checksum_algorithm,
    fsync_dir,
    new_digest,
    write_bytes_atomic,
    write_json_atomic,
)
from vilbert.cache.resume import PROGRESS_NAME, lock_directory, prepare_directory, unlock_directory
from vilbert.cache.spec import CacheSpec
from vilbert.errors import CacheError, UsageError

__all__ = ["CacheWriter", "shard_name"]

log = logging.getLogger(__name__)

WriteMode = Literal["create", "overwrite", "resume"]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


class CacheWriter:
    """Builds a cache directory to `spec`; a context manager that finalizes on a clean exit.

    Making a writer checks its arguments only; entering it takes the directory's lock and prepares
    the directory (refuse, overwrite or resume, see `vilbert.cache.resume`), and leaving it writes
    the manifest, or keeps the completed shards after an exception.

    Args:
        path: The cache directory (created if missing).
        spec: What the cache holds and how it is sharded.
        mode: `create` refuses an existing non-empty directory, `overwrite` replaces a cache,
            `resume` keeps the completed shards of an interrupted build (see `rows_done`).

    Raises:
        UsageError: an unknown mode; on entering, an existing directory without
            `overwrite`/`resume`, or another writer holding the directory.
        CacheError: on entering, `resume` over a cache built with different settings.
    """

    def __init__(self, path: str | os.PathLike[str], spec: CacheSpec, *, mode: WriteMode = "create") -> None:
        if mode not in ("create", "overwrite", "resume"):
            raise UsageError(f"unknown mode {mode!r}; valid: create, overwrite, resume")
        self.path = Path(path)
        self.spec = spec
        self.mode = mode
        self._settings = spec.manifest()
        everything = self._settings.to_dict()
        self._config = {key: everything[key] for key in SETTINGS_KEYS}
        self._schema = self._settings.schema()
        self._rows_per_shard = self._settings.rows_per_shard
        self._pixel_values = CHANNELS * self._settings.image_size**2
        self._pixel_dtype = np.dtype(self._settings.pixel_dtype)  # what `_validated_pixels` lets through
        self._lock: int | None = None
        self._shards: list[ShardInfo] = []
        self._checksum_algorithm = default_checksum_algorithm()
        self._files = ShardFiles()
        self._pixel_start = _pixel_room(self._schema, self._rows_per_shard)
        """Where each shard's first pixel value goes in the file, if what precedes it fits there."""
        self._align_pad = 0
        """Bytes of padding in each record batch's metadata that put the pixels at `_pixel_start`
        (the same for every shard of a cache; found again if a shard's layout differs)."""
        self._stream: PixelStream | None = None
        """The unflushed shard's file, receiving its pixel rows as they come (None: written whole)."""
        self.rows_done = 0
        """Rows in completed shards kept by `resume` (set on entering): the producer skips this many."""
        self._buffers: dict[str, np.ndarray] = {}
        """The unflushed shard's columns (lazily allocated, reused): all but lent pixels."""
        self._pixels: list[_Piece] = []
        """The unflushed shard's pixel rows, in order: views of `_buffers["pixels"]` or lent arrays."""
        self._strings: dict[str, list[str]] = {"key": [], "caption": []}
        self._fill = 0
        self._committer: ThreadPoolExecutor | None = None
        self._commits: deque[Future[None]] = deque()
        self._commit_failed = False
        self._entered = False
        self._finished = False
        self._closed = False
        self.manifest: Manifest | None = None
        """Set by `finish`."""

    def __enter__(self) -> CacheWriter:
        if self._entered:
            raise UsageError(f"cache writer for {self.path} was already entered; make a new one")
        self._entered = True
        self._lock = lock_directory(self.path)
        try:
            self._shards = prepare_directory(self.path, self.mode, self._config, self._schema)
            write_bytes_atomic(self.path / TOKENIZER_NAME, self.spec.tokenizer_bytes)
        except BaseException:
            self._closed = True
            self._release()
            raise
        self.rows_done = sum(s.rows for s in self._shards)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and not self._closed:
            self.finish()
        elif not self._finished:
            self.abort()

    # ------------------------------------------------------------------------------ public API

    def write(
        self,
        keys: Sequence[str],
        pixels: np.ndarray,
        input_ids: np.ndarray,
        num_tokens: np.ndarray,
        labels: np.ndarray | None = None,
        captions: Sequence[str] | None = None,
        *,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Append N rows.

        Args:
            keys: N stable sample ids.
            pixels: `[N, 3, H, W]`: float16 already normalized, or uint8 (normalized here with the
                writer's normalization when the cache stores float16).
            input_ids: `[N, max_len]` integer token ids, padded.
            num_tokens: `[N]` real tokens per row (including special tokens), `<= max_len`.
            labels: `[N]` integer labels, required iff `has_labels`.
            captions: N caption strings, required iff `has_captions`.
            release: Lend `pixels` instead of having them copied: the caller keeps them unchanged
                until `release()` is called (from the thread that calls `write`, `detach` or
                `finish`), once every row is in a written shard. Not called after `abort`.

        Raises:
            UsageError: shapes, dtypes or presence of labels/captions do not match the cache.
        """
        self._require_open()
        columns = self._validated(keys, pixels, input_ids, num_tokens, labels, captions)
        loan = _Loan(release) if release is not None else None
        n, start = len(keys), 0
        while start < n:
            take = min(self._rows_per_shard - self._fill, n - start)
            self._append(columns, start, take, loan)
            start += take
            if self._fill == self._rows_per_shard:
                self._flush_shard()
        if loan is not None:
            loan.returned()  # write's own hold: released now if every piece is already written

    def detach(self) -> int:
        """Copy the lent pixel rows of the unflushed shard into the writer's own buffer and release
        their lenders. Returns the number of rows copied."""
        self._require_open()
        copied = 0
        for index, piece in enumerate(self._pixels):
            if piece.loan is not None:
                owned = self._pixel_buffer()[piece.start : piece.start + len(piece.rows)]
                owned[...] = piece.rows
                self._pixels[index] = _Piece(piece.start, owned, None)
                piece.loan.returned()
                copied += len(owned)
        return copied

    def finish(self, extra: Mapping[str, Any] | None = None) -> Manifest:
        """Flush the last shard and write `_manifest.json` (last, atomically). Idempotent."""
        if self._finished:
            return self.manifest
        self._require_open()
        try:
            if self._fill:
                self._flush_shard()
            self._wait_commits()
            self._stop_committer()
            self.manifest = self._build_manifest(extra or {})
            write_json_atomic(self.path / MANIFEST_NAME, self.manifest.to_dict())
        except BaseException:
            self.abort()
            raise
        (self.path / PROGRESS_NAME).unlink(missing_ok=True)
        self._finished = self._closed = True
        self._release()
        log.info("cache %s: %d rows in %d shards", self.path, self.manifest.num_rows, len(self._shards))
        return self.manifest

    def abort(self) -> None:
        """Drop unflushed rows; completed shards and the progress file stay for `resume`."""
        self._closed = True
        self._buffers, self._pixels = {}, []  # lent rows are dropped without their release
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._stop_committer()
        for tmp in self.path.glob(".shard-*.arrow.tmp"):
            tmp.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            unlock_directory(self.path, self._lock)
            self._lock = None

    # ------------------------------------------------------------------------------ internals

    def _require_open(self) -> None:
        if not self._entered:
            raise UsageError(f"cache writer for {self.path} is not open; use it in a `with` block")
        if self._closed:
            raise UsageError(f"cache writer for {self.path} is already closed")

    def _build_manifest(self, extra: Mapping[str, Any]) -> Manifest:
        return dataclasses.replace(
            self._settings,
            num_rows=sum(s.rows for s in self._shards),
            shards=tuple(self._shards),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=dict(extra),
        )

    def _validated(self, keys, pixels, input_ids, num_tokens, labels, captions) -> dict[str, Any]:
        n, settings = len(keys), self._settings
        columns = {"key": [str(k) for k in keys], "pixels": self._validated_pixels(pixels, n)}
        columns["input_ids"] = _int_column("input_ids", input_ids, (n, settings.max_len), np.int32)
        columns["num_tokens"] = _int_column("num_tokens", num_tokens, (n,), np.int32)
        _check_range("num_tokens", columns["num_tokens"], 0, settings.max_len + 1, "max_len + 1", keys)
        _check_range("input_ids", columns["input_ids"], 0, settings.vocab_size, "vocab_size", keys)
        for name, values, wanted in (
            ("labels", labels, settings.has_labels),
            ("captions", captions, settings.has_captions),
        ):
            if wanted != (values is not None):
                given = "were" if values is not None else "were not"
                raise UsageError(f"cache {self.path} has_{name}={wanted} but {name} {given} given")
        if labels is not None:
            columns["label"] = _int_column("labels", labels, (n,), np.int64)
        if captions is not None:
            if len(captions) != n:
                raise UsageError(f"captions: expected {n} strings (one per key), got {len(captions)}")
            columns["caption"] = [str(c) for c in captions]
        return columns

    def _validated_pixels(self, pixels: Any, n: int) -> np.ndarray:
        settings = self._settings
        pixels = np.asarray(pixels)
        _expect_shape("pixels", pixels, (n, CHANNELS, settings.image_size, settings.image_size))
        if pixels.dtype == np.uint8 and settings.pixel_dtype == "float16":
            pixels = settings.normalization.apply(pixels)
        if pixels.dtype != np.dtype(settings.pixel_dtype):
            allowed = "float16 (normalized) or uint8" if settings.pixel_dtype == "float16" else "uint8"
            raise UsageError(
                f"pixels dtype {pixels.dtype} does not match the {settings.pixel_dtype} cache "
                f"{self.path}; pass {allowed}"
            )
        return pixels.reshape(n, -1)

    def _append(self, columns: dict[str, Any], start: int, take: int, loan: _Loan | None) -> None:
        stop, fill = start + take, self._fill
        for name, value in columns.items():
            if not isinstance(value, np.ndarray) or name == "pixels":
                continue
            if name not in self._buffers:
                self._buffers[name] = np.empty((self._rows_per_shard, *value.shape[1:]), value.dtype)
            self._buffers[name][fill : fill + take] = value[start:stop]
        pixels = columns["pixels"][start:stop]
        if loan is None:
            owned = self._pixel_buffer()[fill : fill + take]
            owned[...] = pixels
            self._pixels.append(_Piece(fill, owned, None))
        else:
            loan.lent()
            self._pixels.append(_Piece(fill, np.ascontiguousarray(pixels), loan))
        if fill == 0:
            row_bytes = self._pixel_values * self._pixel_dtype.itemsize
            self._stream = self._files.stream(self._temp_path(len(self._shards)), self._pixel_start, row_bytes)
        if self._stream is not None:
            self._stream.put(fill, self._pixels[-1].rows)  # to the disk now, while the shard fills
        for name, values in self._strings.items():
            if name in columns:
                values.extend(columns[name][start:stop])
        self._fill += take

    def _temp_path(self, index: int) -> Path:
        """Where shard `index` is written before it is complete (renamed by the commit)."""
        return self.path / f".{shard_name(index)}.tmp"

    def _pixel_buffer(self) -> np.ndarray:
        if "pixels" not in self._buffers:
            shape = (self._rows_per_shard, self._pixel_values)
            self._buffers["pixels"] = aligned_empty(shape, self._pixel_dtype, PIXEL_ALIGNMENT)
        return self._buffers["pixels"]

    def _record_batch(self, placeholder: np.ndarray | None) -> pa.RecordBatch:
        """The unflushed rows as one batch; its pixels are `placeholder` when given, else the buffer."""
        n, arrays = self._fill, []
        for field in self._schema:
            if field.name in self._strings:
                arrays.append(arrow_strings(self._strings[field.name]))
                continue
            if field.name == "pixels":
                values = placeholder if placeholder is not None else self._pixel_buffer()[:n]
            else:
                values = np.ascontiguousarray(self._buffers[field.name][:n])
            flat = arrow_array(values.reshape(-1))
            if values.ndim == 2:
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, type=field.type))
            else:
                arrays.append(flat)
        return pa.record_batch(arrays, schema=self._schema)

    def _flush_shard(self) -> None:
        """Write the buffered rows as the next shard: hash and file write run side by side (both
        release the GIL); the fsync, rename and progress record go to the commit thread, so the
        next shard fills while the disk catches up."""
        index = len(self._shards)
        name, tmp = shard_name(index), self._temp_path(index)
        chunks, size, pixels = self._shard_bytes()
        digest = _Digest(chunks, self._checksum_algorithm)
        try:
            fd = self._files.write(tmp, chunks, pixels, self._stream)  # closed by the commit
            self._stream = None
        finally:
            checksum = digest.result()  # the rows' buffers are reused once this returns
        self._shards.append(ShardInfo(name=name, rows=self._fill, bytes=size, checksum=checksum))
        self._fill = 0
        for values in self._strings.values():
            values.clear()
        pieces, self._pixels = self._pixels, []
        for piece in pieces:
            if piece.loan is not None:
                piece.loan.returned()
        self._commit_later(fd, tmp, list(self._shards))

    def _shard_bytes(self) -> tuple[list[memoryview], int, slice | None]:
        """The unflushed shard's Arrow file as memory views, in order, its size, and which of the
        views hold the pixel rows (None if the IPC writer copied them: then they are not found).

        The batch is laid out around the pixels' memory (a placeholder of their size when rows are
        lent), and the IPC writer hands over each large buffer as a view of that memory, found here
        by address. Padding in the record batch's custom metadata puts the first pixel value at
        `_pixel_start` (or, if what precedes it does not fit there, at the next multiple of
        `PIXEL_ALIGNMENT`), so the rows can go to the disk as they lie in memory (`_shard_file`);
        lent pieces then take the placeholder's place."""
        lent = any(piece.loan is not None for piece in self._pixels)
        placeholder = np.empty((self._fill, self._pixel_values), self._pixel_dtype) if lent else None
        pixels = placeholder if placeholder is not None else self._pixel_buffer()[: self._fill]
        batch = self._record_batch(placeholder)
        target = self._pixel_start
        for _ in range(8):  # the first try fits but for the first shard and a changed layout
            chunks, size = _ipc_file(self._schema, batch, self._align_pad)
            found = [i for i, chunk in enumerate(chunks) if pa.py_buffer(chunk).address == pixels.ctypes.data]
            located = len(found) == 1 and chunks[found[0]].nbytes == pixels.nbytes
            if not located:
                if lent:
                    self.detach()  # an IPC writer that copies: write the shard from the writer's own buffer
                    return self._shard_bytes()
                offset = _pixel_offset(chunks)  # found by reading the file back: the same layout, slower
            else:
                offset = sum(chunk.nbytes for chunk in chunks[: found[0]])
            if offset == target:
                break
            if offset - self._align_pad > target:  # the header outgrew the room: the next aligned offset
                target = -(-(offset - self._align_pad) // PIXEL_ALIGNMENT) * PIXEL_ALIGNMENT
            self._align_pad = max(0, self._align_pad + target - offset)
        if not located:
            return chunks, size, None
        at = found[0]
        if not lent:
            return chunks, size, slice(at, at + 1)
        pieces = [memoryview(piece.rows).cast("B") for piece in self._pixels]
        return chunks[:at] + pieces + chunks[at + 1 :], size, slice(at, at + len(pieces))

    def _commit_later(self, fd: int, tmp: Path, shards: list[ShardInfo]) -> None:
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix=f"cache-commit-{self._settings.split}")
        self._commits.append(self._committer.submit(self._commit, fd, tmp, shards))
        self._wait_commits(keep=1)  # at most one shard waits for the disk while the next one fills

    def _wait_commits(self, keep: int = 0) -> None:
        """Wait until at most `keep` commits are pending; raises the first commit's error."""
        while len(self._commits) > keep:
            self._commits.popleft().result()

    def _commit(self, fd: int, tmp: Path, shards: list[ShardInfo]) -> None:
        """fsync the shard, rename it to its final name, record it in the progress file.

        After a failed commit the later shards are not committed: completed shards stay a prefix."""
        if self._commit_failed:
            os.close(fd)
            return
        try:
            self._commit_shard(fd, tmp, shards)
        except BaseException:
            self._commit_failed = True
            raise

    def _commit_shard(self, fd: int, tmp: Path, shards: list[ShardInfo]) -> None:
        shard = shards[-1]
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
            _drop_from_page_cache(fd)
        finally:
            os.close(fd)
        if size != shard.bytes:
            raise CacheError(f"{tmp}: wrote {shard.bytes} bytes but the file holds {size}")
        os.replace(tmp, self.path / shard.name)
        fsync_dir(self.path)
        write_json_atomic(
            self.path / PROGRESS_NAME,
            {
                "config": self._config,
                "shards": [{"name": s.name, "rows": s.rows, "bytes": s.bytes, "checksum": s.checksum} for s in shards],
            },
        )
        log.debug("cache %s: wrote %s (%d rows, %d bytes)", self.path, shard.name, shard.rows, size)

    def _stop_committer(self) -> None:
        """Wait for pending commits, ignoring their errors (after a failure), and stop the thread."""
        for future in self._commits:
            future.exception()
        self._commits.clear()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Consecutive pixel rows of the unflushed shard, from row `start`: `[rows, pixel_values]`."""

    start: int
    rows: np.ndarray
    loan: _Loan | None
    """None: a view of the writer's own buffer."""


class _Loan:
    """One `write` call's lent pixels, as pieces in one or two shards: `release` runs when the last
    piece is written or copied (and `write` itself has returned: it holds the first count)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._held = 1

    def lent(self) -> None:
        self._held += 1

    def returned(self) -> None:
        self._held -= 1
        if self._held == 0:
            self._release()


_PAD_KEY = "vilbert.pad"
"""The record batch metadata key whose value (spaces) aligns the pixels; readers ignore it."""

_KEY_ROOM = 64
"""Bytes of each row's key that `_pixel_room` leaves room for: its 4-byte offset and 60 bytes (fetch
output's keys take 9, img2dataset's 9, with --key-prefix a few more)."""


def _pixel_room(schema: pa.Schema, rows: int) -> int:
    """The file offset for a shard's first pixel value: past the file's start, the schema and a
    batch header (sized as the whole file of an empty batch, footer included), and `rows` keys of
    `_KEY_ROOM` bytes, rounded up to `PIXEL_ALIGNMENT`. Depends only on the cache's settings, so
    a shard's bytes do not depend on how or when it was written."""
    empty = pa.RecordBatch.from_arrays([pa.nulls(0, field.type) for field in schema], schema=schema)  # no pandas
    _, size = _ipc_file(schema, empty, 0)
    return -(-(size + rows * _KEY_ROOM) // PIXEL_ALIGNMENT) * PIXEL_ALIGNMENT


def _ipc_file(schema: pa.Schema, batch: pa.RecordBatch, pad: int) -> tuple[list[memoryview], int]:
    """`batch` as an Arrow IPC file: its pieces in order (large buffers as views) and its size."""
    sink = _CollectingSink()
    with pa.ipc.new_file(sink, schema) as ipc:
        ipc.write_batch(batch, custom_metadata={_PAD_KEY: " " * pad})
    return sink.chunks, sink.size


def _pixel_offset(chunks: list[memoryview]) -> int:
    """Where the pixel values start in the Arrow file made of `chunks` (read back from a copy)."""
    data = pa.py_buffer(b"".join(chunks))
    values = pa.ipc.open_file(data).get_batch(0).column("pixels").values
    return values.buffers()[1].address + values.offset * values.type.byte_width - data.address


class _CollectingSink:
    """A write-only file for Arrow's IPC writer that keeps what it is given, in order, without
    copying: large buffers arrive as views of the batch's own memory, small pieces as bytes."""

    def __init__(self) -> None:
        self.chunks: list[memoryview] = []
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.chunks.append(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


class _Digest:
    """The checksum of `chunks`, computed on its own thread (hashlib and xxhash release the GIL on
    large inputs)."""

    def __init__(self, chunks: Sequence[memoryview], algorithm: str) -> None:
        self._algorithm = algorithm
        self._digest = new_digest(algorithm)
        self._thread = threading.Thread(target=self._run, args=(chunks,), name="cache-checksum", daemon=True)
        self._thread.start()

    def _run(self, chunks: Sequence[memoryview]) -> None:
        for chunk in chunks:
            self._digest.update(chunk)

    def result(self) -> str:
        self._thread.join()
        return f"{self._algorithm}:{self._digest.hexdigest()}"


# ------------------------------------------------------------------------------------- helpers


def _drop_from_page_cache(fd: int) -> None:
    """Let the kernel reuse a synced shard's page-cache pages for the next shard.

    A cache is written once and read later (usually far larger than RAM); kept in the page cache,
    each shard takes fresh pages, and filling fresh pages cost 5x more than reusing freed ones
    here (250-330 ms against 50-80 ms per 128 MiB `write()`, measured on the 2-core VM)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as err:  # advice only: a file system may not take it
            log.debug("posix_fadvise(DONTNEED) refused (%s); the shard stays in the page cache", err)


def _expect_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise UsageError(f"{name}: expected shape {list(shape)}, got {list(array.shape)}")


def _check_range(name: str, values: np.ndarray, low: int, high: int, bound: str, keys: Sequence[str]) -> None:
    if values.size and (values.min() < low or values.max() >= high):
        raise UsageError(
            f"{name} must be in [{low}, {bound}={high}), got {values.min()}..{values.max()} "
            f"(rows {keys[0]!r}..{keys[-1]!r})"
        )


def _int_column(name: str, values: Any, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    array = np.asarray(values)
    _expect_shape(name, array, shape)
    if not np.issubdtype(array.dtype, np.integer):
        raise UsageError(f"{name}: expected integers, got dtype {array.dtype}")
    if array.size and array.dtype.itemsize > np.dtype(dtype).itemsize:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise UsageError(f"{name}: values {array.min()}..{array.max()} do not fit {np.dtype(dtype).name}")
    return array.astype(dtype, copy=False)
