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

A shard's pixels can also go to the disk while the shard fills (`PixelStream`): the writer reserves
room for everything before them, so their offset is known before the rest of the file is, and each
piece of rows is written at its place as it arrives; when the shard is complete only the bytes
before and after them remain to write. The disk then works while the rows are being decoded, not
after the last of them (docs/results.md, appendix C). Whatever
stops a piece from going straight to the disk (unaligned memory, a refusal, a layout that outgrew the
reserved room) leaves the whole file to be written at the end, as without streaming.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vilbert.cache.format import aligned_empty

__all__ = ["PIXEL_ALIGNMENT", "DIRECT_ALIGNMENT", "PixelStream", "ShardFiles"]

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

    def stream(self, path: Path, offset: int, row_bytes: int) -> PixelStream | None:
        """Create `path` to receive pixel rows as they come, the first at file `offset`; None when
        they cannot go straight to the disk (then `write` writes the whole file at the end)."""
        if not self.direct or offset % PIXEL_ALIGNMENT or row_bytes % DIRECT_ALIGNMENT:
            return None
        fd = self._open_direct(path)
        return None if fd is None else PixelStream(self, path, fd, offset, row_bytes)

    def write(
        self, path: Path, chunks: Sequence[memoryview], pixels: slice | None, streamed: PixelStream | None = None
    ) -> int:
        """Create `path` holding `chunks` in order; `pixels` indexes the chunks that hold pixel rows
        (None: not known, write through the page cache). `streamed`: the file's `PixelStream`, whose
        rows are used where they are all on the disk at the offset `chunks` puts them (else the file
        is written afresh). Returns the open file descriptor, written but not yet fsynced."""
        if streamed is not None:
            fd = streamed.complete(chunks, pixels)
            if fd is not None:
                return fd
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

    def _open_direct(self, path: Path) -> int | None:
        """`path` created for direct writes; None if the file system refuses them."""
        try:
            return os.open(path, _CREATE | _O_DIRECT, 0o644)
        except OSError as err:
            if err.errno not in _REFUSED:
                raise
            self._refused(path, err)
            return None

    def _try_direct(self, path: Path, chunks: Sequence[memoryview], pixels: slice) -> int | None:
        fd = self._open_direct(path)
        return None if fd is None else self._finish_direct(path, fd, chunks, pixels)

    def _finish_direct(
        self, path: Path, fd: int, chunks: Sequence[memoryview], pixels: slice, *, pixels_written: bool = False
    ) -> int | None:
        """`_write_direct` into `fd`, returned; on a refusal it is closed and None returned."""
        try:
            self._write_direct(fd, chunks, pixels, pixels_written=pixels_written)
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

    def _write_direct(self, fd: int, chunks: Sequence[memoryview], pixels: slice, *, pixels_written: bool) -> None:
        """The file's bytes before and after its pixel rows through the bounce buffer, and the rows
        themselves as they lie in memory (unless `pixels_written`: a `PixelStream` wrote them)."""
        head, offset = self._bounced(chunks[: pixels.start])
        _pwrite_all(fd, head, 0)
        for piece in chunks[pixels]:
            if not pixels_written:
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


class PixelStream:
    """One shard file's pixel rows, written straight from memory as they arrive: row `r` at
    `offset + r * row_bytes`. Made by `ShardFiles.stream`; completed (or given up) by `ShardFiles.write`."""

    def __init__(self, files: ShardFiles, path: Path, fd: int, offset: int, row_bytes: int) -> None:
        self.path, self.offset, self.row_bytes = path, offset, row_bytes
        self.rows = 0
        """Rows on the disk, from the first: `put` takes them in order."""
        self.broken = False
        """A piece could not go to the disk directly: the file is written afresh at the end."""
        self._files, self._fd = files, fd

    def put(self, row: int, rows: np.ndarray) -> None:
        """Write `rows` (`[n, ...]`, C-contiguous) as rows `row`, `row + 1`, ... of the shard."""
        if self.broken or self._fd is None:
            return
        whole = rows.flags.c_contiguous and rows.nbytes == len(rows) * self.row_bytes
        if row != self.rows or not whole or rows.ctypes.data % DIRECT_ALIGNMENT:
            self.broken = True
            return
        try:
            _pwrite_all(self._fd, memoryview(rows).cast("B"), self.offset + row * self.row_bytes)
        except OSError as err:
            if err.errno not in _REFUSED:
                raise
            self._files._refused(self.path, err)
            self.broken = True
            return
        self.rows += len(rows)

    def complete(self, chunks: Sequence[memoryview], pixels: slice | None) -> int | None:
        """Write the bytes before and after the streamed rows and return the file descriptor, if
        `chunks` put exactly the streamed rows at `offset`; else close the file and return None."""
        fd, self._fd = self._fd, None
        if fd is None:
            return None
        if not self.broken and pixels is not None and self._holds(chunks, pixels):
            return self._files._finish_direct(self.path, fd, chunks, pixels, pixels_written=True)
        os.close(fd)
        return None

    def _holds(self, chunks: Sequence[memoryview], pixels: slice) -> bool:
        """Whether the streamed rows are exactly `chunks[pixels]`, where `chunks` puts them."""
        before = sum(chunk.nbytes for chunk in chunks[: pixels.start])
        return before == self.offset and sum(chunk.nbytes for chunk in chunks[pixels]) == self.rows * self.row_bytes

    def close(self) -> None:
        """Give the file up (the shard is abandoned)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


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
