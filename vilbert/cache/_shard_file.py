"""Writing one shard file: its pixel rows straight from memory to the disk (`O_DIRECT`) where the
file system takes that, else through the page cache.

A buffered `write()` copies every byte into the page cache, and the kernel's copy of a cache's
pixels was preprocess's largest CPU cost after the JPEG decode (docs/results.md, appendix C); a
direct write hands the device the caller's memory, and the CPU only pins the pages. Direct writes need the
file offset, the length and the memory address of each write aligned to the device's block size.
The writer lays every shard out so that its pixel values start at a multiple of
`PIXEL_ALIGNMENT` in the file, and pixel rows are whole multiples of `DIRECT_ALIGNMENT` bytes at the
usual image sizes, so the pixel pieces go to the disk as they lie in memory; the few kilobytes
before and after them go through a small aligned bounce buffer, and the file is then cut to its
size. Anything unaligned (an odd image size, a device with larger blocks), or a file system that
refuses `O_DIRECT` (EINVAL: tmpfs on older kernels, some FUSE mounts), gets the page-cache path:
the same bytes, only more CPU. Either way the caller fsyncs the file before it counts as written.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vilbert.cache.format import aligned_empty

__all__ = ["PIXEL_ALIGNMENT", "DIRECT_ALIGNMENT", "ShardFiles"]

log = logging.getLogger(__name__)

PIXEL_ALIGNMENT = 4096
"""File offset of every shard's first pixel value: a multiple of this (a page, and any device's block)."""

DIRECT_ALIGNMENT = 512
"""What a direct write's offset, length and memory address must be multiples of (the logical block
of common disks; a device that needs more refuses with EINVAL and the page cache takes over)."""

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


class ShardFiles:
    """Writes shard files for one cache; stops trying direct writes once the file system refuses one.

    Args:
        direct: Try direct writes; None: unless the environment sets `VILBERT_DIRECT_IO=0` (for a
            file system that takes `O_DIRECT` but serves it slowly).
    """

    def __init__(self, direct: bool | None = None) -> None:
        if direct is None:
            direct = os.environ.get("VILBERT_DIRECT_IO", "1").strip() != "0"
        self.direct = direct and bool(_O_DIRECT)
        self._bounce = np.empty(0, np.uint8)

    def write(self, path: Path, chunks: Sequence[memoryview], pixels: slice | None) -> int:
        """Create `path` holding `chunks` in order; `pixels` indexes the chunks that hold pixel rows
        (None: not known, write through the page cache). Returns the open file descriptor, written
        but not yet fsynced."""
        if self.direct and pixels is not None and _direct_writable(chunks, pixels):
            fd = self._try_direct(path, chunks, pixels)
            if fd is not None:
                return fd
        fd = os.open(path, _CREATE, 0o644)
        try:
            offset = 0
            for chunk in chunks:
                _pwrite_all(fd, chunk, offset)
                offset += chunk.nbytes
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_direct(self, path: Path, chunks: Sequence[memoryview], pixels: slice) -> int | None:
        try:
            fd = os.open(path, _CREATE | _O_DIRECT, 0o644)
        except OSError as err:
            if err.errno not in _REFUSED:
                raise
            self._refused(path, err)
            return None
        try:
            self._write_direct(fd, chunks, pixels)
        except OSError as err:
            os.close(fd)
            if err.errno not in _REFUSED:
                raise
            self._refused(path, err)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refused(self, path: Path, err: OSError) -> None:
        log.info("%s: direct writes refused (%s); shards go through the page cache", path.parent, err.strerror)
        self.direct = False

    def _write_direct(self, fd: int, chunks: Sequence[memoryview], pixels: slice) -> None:
        head, offset = self._bounced(chunks[: pixels.start])
        _pwrite_all(fd, head, 0)
        for piece in chunks[pixels]:
            _pwrite_all(fd, piece, offset)
            offset += piece.nbytes
        tail, tail_bytes = self._bounced(chunks[pixels.stop :], pad_to=DIRECT_ALIGNMENT)
        _pwrite_all(fd, tail, offset)
        os.ftruncate(fd, offset + tail_bytes)  # the tail was padded to a whole block

    def _bounced(self, chunks: Sequence[memoryview], pad_to: int = 1) -> tuple[memoryview, int]:
        """`chunks` copied one after another into an aligned buffer, zero-padded to a multiple of
        `pad_to`, and their size without the padding."""
        size = sum(chunk.nbytes for chunk in chunks)
        padded = -(-size // pad_to) * pad_to
        if self._bounce.nbytes < padded:
            self._bounce = aligned_empty((2 * padded,), np.uint8, PIXEL_ALIGNMENT)
        buffer = self._bounce[:padded]
        at = 0
        for chunk in chunks:
            buffer[at : at + chunk.nbytes] = np.frombuffer(chunk, np.uint8)
            at += chunk.nbytes
        buffer[at:] = 0
        return memoryview(buffer), size


def _direct_writable(chunks: Sequence[memoryview], pixels: slice) -> bool:
    if sum(chunk.nbytes for chunk in chunks[: pixels.start]) % DIRECT_ALIGNMENT:
        return False
    return all(
        piece.nbytes % DIRECT_ALIGNMENT == 0 and np.frombuffer(piece, np.uint8).ctypes.data % DIRECT_ALIGNMENT == 0
        for piece in chunks[pixels]
    )


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view, offset = view[written:], offset + written
