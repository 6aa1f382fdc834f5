"""`tar_stream` reads what Python's `tarfile` reads, in every format `tarfile` writes, and refuses
damaged archives wherever the damage is."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from vilbert.pipeline.tar_stream import MAX_EXTENDED_HEADER, TarFormatError, open_tar_stream

LONG = "deep/" * 30 + "0000000012.jpg"  # 164 characters: a GNU long name, a pax path, a ustar prefix


def _archive(fmt: int, compress=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, size in [("a/000.jpg", 0), ("a/000.txt", 1), ("b.json", 511), ("c.jpg", 512), ("d.jpg", 513),
                           ("e.jpg", 10_000), (LONG, 700)]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes((i * 7 + len(name)) % 256 for i in range(size))))
        for name, kind in [("dir", tarfile.DIRTYPE), ("link", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE),
                           ("fifo", tarfile.FIFOTYPE)]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "c.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
        if fmt == tarfile.PAX_FORMAT:
            info = tarfile.TarInfo("caf\u00e9/\U0001f431.txt")  # a pax path in UTF-8
            info.size = 3
            tar.addfile(info, io.BytesIO(b"cat"))
        info = tarfile.TarInfo("last.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    data = buffer.getvalue()
    return compress(data) if compress else data


def _ours(data: bytes, read=lambda name: True) -> list[tuple]:
    tar = open_tar_stream(io.BytesIO(data))
    return [(m.name, m.size, m.regular, tar.read() if m.regular and read(m.name) else None) for m in tar]


def _tarfile(data: bytes, read=lambda name: True) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        rows = []
        for info in tar:
            body = tar.extractfile(info).read() if info.isreg() and read(info.name) else None
            rows.append((info.name, info.size, info.isreg(), body))
        return rows


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT], ids=["gnu", "pax", "ustar"]
)
@pytest.mark.parametrize("compress", [None, gzip.compress, bz2.compress, lzma.compress], ids=["tar", "gz", "bz2", "xz"])
def test_reads_what_tarfile_reads(fmt: int, compress) -> None:
    data = _archive(fmt, compress)
    ours = _ours(data)
    assert ours == _tarfile(data)
    assert {name for name, *_ in ours} >= {LONG, "dir", "link", "last.txt"}
    skipping = lambda name: name.endswith(".txt")  # noqa: E731 - the data of the others is read past
    assert _ours(data, skipping) == _tarfile(data, skipping)


def test_a_base256_size_and_a_signed_checksum_are_read() -> None:
    header = bytearray(_archive(tarfile.GNU_FORMAT)[:512])  # a/000.jpg, size 0
    header[124:136] = b"\x80" + (0).to_bytes(11, "big")
    header[0:9] = b"a/\xe9\xe9\xe9.jpg"  # high bytes: the signed and unsigned sums differ
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    header[148:156] = b"%06o\0 " % signed
    members = _ours(bytes(header) + bytes(1024))
    assert [(size, regular, body) for _, size, regular, body in members] == [(0, True, b"")]


def _damaged(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"this is not a tar file at all" * 40, "not a tar header at byte 0"),
        (lambda d: d[: 2048 + 300], "unexpected end of data in the data of b.json"),
        (lambda d: d[: 512 + 300], "unexpected end of data"),  # inside the second header
        (lambda d: _damaged(d, 1536 + 2, b"X"), "not a tar header at byte 1536"),  # a later header
        (lambda d: d[: 5632 + 5000], "unexpected end of data: 5,.* bytes short"),  # in e.jpg, read past
    ],
    ids=["junk", "cut-in-data", "cut-in-header", "bad-later-header", "cut-in-skipped-data"],
)
def test_damage_is_an_error_wherever_it_is(damage, message: str) -> None:
    data = damage(_archive(tarfile.USTAR_FORMAT))
    with pytest.raises(TarFormatError, match=message):
        _ours(data, read=lambda name: name != "e.jpg")


def test_an_oversized_extended_header_is_refused_unread() -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, MAX_EXTENDED_HEADER + 1
    data = info.tobuf(tarfile.GNU_FORMAT)  # the header alone: no data follows
    with pytest.raises(TarFormatError, match="extended header of 1,048,577 bytes"):
        _ours(data)


def test_read_takes_the_current_member_once() -> None:
    tar = open_tar_stream(io.BytesIO(_archive(tarfile.USTAR_FORMAT)))
    first = next(iter(tar))
    assert tar.read() == b"" and first.size == 0
    with pytest.raises(ValueError, match="once"):
        tar.read()


@pytest.mark.parametrize("size", [b"-5", b"5x", b"99999999999999999999" * 300])
def test_a_pax_size_that_is_not_a_count_is_refused(size: bytes) -> None:
    """A negative size would make the member's read take the rest of the stream."""
    record = b" size=" + size + b"\n"
    record = b"%d%s" % (len(record) + len(str(len(record))), record)
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(record)
    member = tarfile.TarInfo("x.jpg")
    data = info.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512) + member.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(TarFormatError, match="bad pax (size|record)"):
        _ours(data + bytes(1024))
