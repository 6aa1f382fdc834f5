"""One forward pass over a tar archive's members, for webdataset shards.

Python's `tarfile` in stream mode (`r|*`) builds a `TarInfo` per member through several layers of
Python and reads the data through its own 10 KiB buffer: on img2dataset's shards (three small members
a sample) that cost more of preprocess's main thread than the rest of the webdataset source. This
reader parses the 512-byte headers itself (ustar, GNU and pax, as `tarfile` reads them: GNU long
names, pax `path` and `size`, the ustar prefix, base-256 sizes) and reads or skips each member's
data with one call. It is stricter than `tarfile`: a header with a bad checksum, a header cut short
and a member whose data runs past the end are errors wherever they occur (`tarfile` ends the
archive silently at a bad header after the first), so a damaged shard is never mistaken for a short
one. gzip, bzip2 and xz archives are read through their decompressors, as `r|*` does.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["MAX_EXTENDED_HEADER", "TarFormatError", "TarMember", "TarStream", "open_tar_stream"]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file (as tarfile reads them)
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: no data blocks
_POSIX_MAGIC = b"ustar\x0000"
_HIGH_BYTES = bytes(range(128, 256))
_SKIP_CHUNK = 1 << 20
MAX_EXTENDED_HEADER = 1 << 20


class TarFormatError(ValueError):
    """The archive is damaged or is not a tar archive."""


@dataclass(frozen=True)
class TarMember:
    name: str
    size: int
    regular: bool
    """A regular file (the only members with data a caller can read)."""


class TarStream:
    """The members of a tar archive in order, read once from `handle` (positioned at its start).

    Iterating yields each member; before asking for the next one, the caller may `read()` the
    current member's data (once); data left unread is read past. Extended headers (GNU long names,
    pax records) over `MAX_EXTENDED_HEADER` bytes are refused: no header can exhaust memory.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._offset = 0
        self._unread = 0  # data and padding of the current member not yet consumed
        self._current: TarMember | None = None

    def __iter__(self) -> Iterator[TarMember]:
        long_name: str | None = None
        pax: dict[bytes, bytes] = {}
        while True:
            self._skip(self._unread)
            self._unread, self._current = 0, None
            start = self._offset
            block = self._read_exactly(BLOCK, allow_empty=True, what="a member header")
            if not block or block == _ZERO_BLOCK:
                return  # the end-of-archive marker (or a clean end at a member boundary)
            _check_checksum(block, start)
            kind = block[156:157]
            size = _number(block[124:136], "size", start)
            if kind in (b"L", b"K", b"x", b"g"):  # GNU long name/link, pax headers: data for the next one
                if size > MAX_EXTENDED_HEADER:
                    raise TarFormatError(f"an extended header of {size:,} bytes at byte {start}")
                data = self._read_exactly(size, what=f"the extended header at byte {start}")
                self._skip(-size % BLOCK)
                if kind == b"L":
                    long_name = _text(data.split(b"\0", 1)[0])
                elif kind == b"x":
                    pax = _pax_records(data, start)
                continue
            name = _text(block[0:100].split(b"\0", 1)[0])
            if block[257:265] == _POSIX_MAGIC and kind != b"S":
                prefix = _text(block[345:500].split(b"\0", 1)[0])
                name = f"{prefix}/{name}" if prefix else name
            name = _text(pax[b"path"]) if b"path" in pax else long_name if long_name is not None else name
            if b"size" in pax:
                value = pax[b"size"]
                size = int(value) if value.isdigit() and len(value) <= 20 else -1
                if size < 0:
                    raise TarFormatError(f"bad pax size {pax[b'size'][:40]!r} at byte {start}")
            regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
            if kind == b"5":
                name = name.rstrip("/")  # as tarfile names directories
            long_name, pax = None, {}
            self._unread = 0 if kind in _NO_DATA else size + (-size % BLOCK)
            self._current = TarMember(name, size, regular)
            yield self._current

    def read(self) -> bytes:
        """The current member's data, whole."""
        member = self._current
        if member is None or not member.regular:
            raise ValueError("read() takes the data of the regular member just yielded, once")
        self._current = None
        data = self._read_exactly(member.size, what=f"the data of {member.name}")
        self._unread -= member.size
        return data

    def _read_exactly(self, n: int, *, what: str, allow_empty: bool = False) -> bytes:
        data = self._handle.read(n) if n else b""
        self._offset += len(data)
        if len(data) != n and not (allow_empty and not data):
            raise TarFormatError(f"unexpected end of data in {what} ({len(data)} of {n} bytes)")
        return data

    def _skip(self, n: int) -> None:
        while n > 0:  # read and dropped in chunks: a forward seek may pass the end silently
            got = len(self._handle.read(min(n, _SKIP_CHUNK)))
            if got == 0:
                raise TarFormatError(f"unexpected end of data: {n:,} bytes short after byte {self._offset:,}")
            self._offset += got
            n -= got


def open_tar_stream(raw: BinaryIO) -> TarStream:
    """A `TarStream` over `raw`, through gzip, bzip2 or xz when its first bytes say so."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return TarStream(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[arg-type]
    if head.startswith(b"BZh"):
        return TarStream(bz2.BZ2File(raw))  # type: ignore[arg-type]
    if head.startswith(b"\xfd7zXZ\x00"):
        return TarStream(lzma.LZMAFile(raw))  # type: ignore[arg-type]
    return TarStream(raw)


def _check_checksum(block: bytes, start: int) -> None:
    try:
        stored = _number(block[148:156], "checksum", start)
    except TarFormatError:
        raise TarFormatError(f"not a tar header at byte {start} (no checksum)") from None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return
    rest = block[:148] + block[156:]
    signed = unsigned - 256 * (len(rest) - len(rest.translate(None, _HIGH_BYTES)))  # old tars summed signed bytes
    if stored != signed:
        raise TarFormatError(f"not a tar header at byte {start} (checksum {stored} != {unsigned})")


def _number(field: bytes, what: str, start: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256: a big-endian number after the marker byte
        if field[0] != 0x80:
            raise TarFormatError(f"negative {what} in the header at byte {start}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad {what} field {field!r} in the header at byte {start}") from None


def _pax_records(data: bytes, start: int) -> dict[bytes, bytes]:
    """`LENGTH KEY=VALUE\\n` records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"bad pax record in the header at byte {start}") from None
        record = data[space + 1 : pos + length]
        if space < 0 or not 0 < length <= len(data) - pos or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError(f"bad pax record in the header at byte {start}")
        key, value = record[:-1].split(b"=", 1)
        records[key] = value
        pos += length
    return records


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
