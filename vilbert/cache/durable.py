"""Write a shard's bytes to disk durably, past the page cache where the file system allows it.

A cache is written once and read much later, usually far larger than RAM. Written through the page
cache, every byte is copied into fresh kernel pages, written back by the kernel's flusher and then
dropped again (`posix_fadvise`): on the 2-core VM that was the preprocess writer's largest cost
after the copies themselves (docs/results.md, appendix C). With `O_DIRECT` the disk reads the
bytes from our memory: the data goes through one reused, page-aligned staging buffer (O_DIRECT
wants aligned memory, offsets and lengths), the last block is padded and the file cut to its size.

A file system that refuses `O_DIRECT` (or its alignment) gets the same bytes through the page
cache instead: the result on disk is the same either way, and `fsync` makes it durable in both.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["STAGING_BYTES", "write_durably"]

log = logging.getLogger(__name__)

STAGING_BYTES = 8 << 20
"""The staging buffer per writing thread: large writes, small enough to stay in the CPU's caches
while the disk reads it."""
_BLOCK = 4096
"""Offsets and lengths of direct writes: a multiple of every common logical block size (512, 4096)."""
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
_STAGING = threading.local()


def write_durably(path: Path, chunks: Sequence[memoryview], size: int, *, direct: bool = True) -> str:
    """Write `chunks` (`size` bytes in all) to `path` (created or truncated), fsync it.

    Args:
        path: The file to write.
        chunks: The bytes, in order (byte-format memoryviews).
        size: Their total length.
        direct: Try `O_DIRECT` first; `False` writes through the page cache.

    Returns:
        `"direct"` or `"buffered"`: how the bytes went to the disk.

    Raises:
        OSError: the write or the fsync failed (a full disk, an I/O error): not a refusal of O_DIRECT.
    """
    if direct and hasattr(os, "O_DIRECT"):
        try:
            _write_direct(path, chunks, size)
            return "direct"
        except OSError as err:
            if err.errno not in _REFUSED:
                raise
            log.debug("%s: O_DIRECT refused (%s); writing through the page cache", path, err)
    _write_buffered(path, chunks)
    return "buffered"


def _write_direct(path: Path, chunks: Sequence[memoryview], size: int) -> None:
    staging = _staging_buffer()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        fill = 0
        for chunk in chunks:
            position, length = 0, chunk.nbytes
            while position < length:
                take = min(STAGING_BYTES - fill, length - position)
                staging[fill : fill + take] = chunk[position : position + take]
                fill, position = fill + take, position + take
                if fill == STAGING_BYTES:
                    _write_all(fd, staging[:fill])
                    fill = 0
        if fill:
            padded = -(-fill // _BLOCK) * _BLOCK
            staging[fill:padded] = bytes(padded - fill)
            _write_all(fd, staging[:padded])
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:  # a short write leaves an unaligned rest: its EINVAL falls back to buffered
        written = os.write(fd, data)
        if written <= 0:
            raise OSError(errno.EIO, f"direct write of {data.nbytes} bytes wrote nothing")
        data = data[written:]


def _write_buffered(path: Path, chunks: Sequence[memoryview]) -> None:
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
        _drop_from_page_cache(handle.fileno())


def _staging_buffer() -> memoryview:
    buffer = getattr(_STAGING, "buffer", None)
    if buffer is None:  # anonymous mappings are page-aligned, as O_DIRECT wants its memory
        buffer = _STAGING.buffer = memoryview(mmap.mmap(-1, STAGING_BYTES))
    return buffer


def _drop_from_page_cache(fd: int) -> None:
    """Let the kernel reuse a synced file's page-cache pages for the next one (kept, each shard
    takes fresh pages, and filling fresh pages cost 5x more than reusing freed ones on the 2-core
    VM: docs/results.md, appendix C)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as err:  # advice only: a file system may not take it
            log.debug("posix_fadvise(DONTNEED) refused (%s); the file stays in the page cache", err)
