"""Shard files: pixels at an aligned offset, written straight from memory (O_DIRECT) where the file
system takes it, through the page cache otherwise, the same bytes either way."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pyarrow as pa
import pytest

from vilbert.cache import CacheReader
from vilbert.cache import _shard_file as shard_file
from vilbert.cache.format import aligned_empty

from .conftest import build_cache, make_rows, new_writer, shard_files


def _pixel_offset(path) -> int:
    data = pa.py_buffer(path.read_bytes())
    values = pa.ipc.open_file(data).get_batch(0).column("pixels").values
    return values.buffers()[1].address - data.address


class _Disk:
    """Records, for each shard file opened for writing, whether with O_DIRECT; `refuse` ("open" or
    "write") makes direct I/O fail there with EINVAL, as file systems without it do."""

    def __init__(self) -> None:
        self.opened: list[bool] = []
        self.refuse: str | None = None
        self.refusals = 0
        self.direct_fds: set[int] = set()


@pytest.fixture
def disk(monkeypatch):
    disk, real_open, real_pwrite = _Disk(), os.open, os.pwrite

    def fake_open(path, flags, *args):
        if not os.path.basename(str(path)).startswith(".shard-"):
            return real_open(path, flags, *args)
        direct = bool(shard_file._O_DIRECT and flags & shard_file._O_DIRECT)
        disk.opened.append(direct)
        if direct and disk.refuse == "open":
            disk.refusals += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        if disk.refuse == "write":
            flags &= ~shard_file._O_DIRECT  # a real buffered file; its direct writes fail below
        fd = real_open(path, flags, *args)
        (disk.direct_fds.add if direct else disk.direct_fds.discard)(fd)
        return fd

    def fake_pwrite(fd, data, offset):
        if disk.refuse == "write" and fd in disk.direct_fds:
            disk.refusals += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_file.os, "open", fake_open)
    monkeypatch.setattr(shard_file.os, "pwrite", fake_pwrite)
    return disk


@pytest.mark.skipif(not shard_file._O_DIRECT, reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("lent", [False, True])
def test_direct_and_page_cache_writes_give_the_same_aligned_shards(tmp_path, monkeypatch, disk, caplog, lent):
    rows = make_rows(20, "float16")  # 16x16 float16 rows: 1,536 bytes, whole 512-byte blocks

    def build(path):
        with new_writer(path) as writer:
            for s in range(0, 20, 5):
                pixels = aligned_empty(rows["pixels"][s : s + 5].shape, np.float16) if lent else None
                if pixels is not None:
                    pixels[...] = rows["pixels"][s : s + 5]
                args = [rows[k][s : s + 5] for k in ("keys", "input_ids", "num_tokens", "labels", "captions")]
                writer.write(args[0], rows["pixels"][s : s + 5] if pixels is None else pixels, *args[1:],
                             release=(lambda: None) if lent else None)  # fmt: skip

    with caplog.at_level(logging.INFO, logger=shard_file.__name__):
        build(tmp_path / "direct")
    refused = "direct writes refused" in caplog.text  # this machine's file system may not take them
    assert disk.opened and (all(disk.opened) or refused)  # tried for every shard until a refusal
    monkeypatch.setattr(shard_file, "_O_DIRECT", 0)
    disk.opened.clear()
    build(tmp_path / "buffered")
    assert disk.opened and not any(disk.opened)

    direct, buffered = shard_files(tmp_path / "direct"), shard_files(tmp_path / "buffered")
    assert len(direct) == 3
    for a, b in zip(direct, buffered, strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert _pixel_offset(a) % shard_file.PIXEL_ALIGNMENT == 0
    got = CacheReader(tmp_path / "direct").gather(np.arange(20))
    assert got["pixels"].tobytes() == rows["pixels"].tobytes()


@pytest.mark.parametrize("where", ["open", "write"])
def test_a_file_system_refusing_direct_writes_gets_the_same_shards_through_the_page_cache(
    tmp_path, monkeypatch, disk, caplog, where
):
    monkeypatch.setattr(shard_file, "_O_DIRECT", 0)
    build_cache(tmp_path / "plain", n=20)
    monkeypatch.setattr(shard_file, "_O_DIRECT", 0o40000)  # Linux's O_DIRECT bit, refused wherever we run
    disk.refuse, disk.opened = where, []
    with caplog.at_level(logging.INFO, logger=shard_file.__name__):
        build_cache(tmp_path / "refused", n=20)
    assert disk.refusals == 1 and disk.opened[:2] == [True, False] and not any(disk.opened[2:])  # once only
    assert caplog.text.count("direct writes refused") == 1
    plain, refused = shard_files(tmp_path / "plain"), shard_files(tmp_path / "refused")
    assert len(plain) == 3
    for a, b in zip(plain, refused, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_rows_that_are_not_whole_blocks_go_through_the_page_cache(tmp_path, disk):
    rows = build_cache(tmp_path / "c", n=21, dtype="uint8")  # shards of 7 rows of 768 bytes: 10.5 blocks
    assert disk.opened and not any(disk.opened)
    assert CacheReader(tmp_path / "c").gather(np.arange(21))["pixels"].tobytes() == rows["pixels"].tobytes()
    for file in shard_files(tmp_path / "c"):
        assert _pixel_offset(file) % shard_file.PIXEL_ALIGNMENT == 0


def test_vilbert_direct_io_0_keeps_shards_in_the_page_cache(tmp_path, monkeypatch, disk):
    monkeypatch.setenv("VILBERT_DIRECT_IO", "0")
    rows = build_cache(tmp_path / "c", n=20)  # float16 rows: whole blocks, direct otherwise
    assert disk.opened and not any(disk.opened)
    assert CacheReader(tmp_path / "c").gather(np.arange(20))["pixels"].tobytes() == rows["pixels"].tobytes()


def test_aligned_empty_starts_on_a_page():
    for shape in [(1,), (3, 224, 224), (7, 1536)]:
        array = aligned_empty(shape, np.float16)
        assert array.shape == shape and array.ctypes.data % shard_file.PIXEL_ALIGNMENT == 0


@pytest.mark.skipif(not shard_file._O_DIRECT, reason="no O_DIRECT on this platform")
def test_pixel_rows_reach_the_disk_while_their_shard_fills(tmp_path, disk, caplog):
    rows = make_rows(7, "float16")  # one shard of 7 rows of 1,536 bytes: whole 512-byte blocks
    pixels = aligned_empty(rows["pixels"].shape, np.float16)
    pixels[...] = rows["pixels"]
    with caplog.at_level(logging.INFO, logger=shard_file.__name__), new_writer(tmp_path / "c") as writer:
        args = [rows[k][:5] for k in ("keys", "input_ids", "num_tokens", "labels", "captions")]
        writer.write(args[0], pixels[:5], *args[1:], release=lambda: None)
        tmp = tmp_path / "c" / ".shard-00000.arrow.tmp"
        if "direct writes refused" in caplog.text:  # this machine's file system does not take them
            assert not tmp.exists() or tmp.stat().st_size == 0
        else:  # five of the shard's seven rows are in its file already, where the finished file has them
            start = writer._pixel_start
            assert start % shard_file.PIXEL_ALIGNMENT == 0 and start >= 4096
            assert tmp.read_bytes()[start:] == pixels[:5].tobytes()
        args = [rows[k][5:] for k in ("keys", "input_ids", "num_tokens", "labels", "captions")]
        writer.write(args[0], pixels[5:], *args[1:], release=lambda: None)
    (file,) = shard_files(tmp_path / "c")
    if "direct writes refused" in caplog.text:
        assert disk.opened == [True, False]  # refused once, then the page cache
    else:
        assert disk.opened == [True]  # streamed, then completed in place: never opened twice
    assert _pixel_offset(file) == writer._pixel_start
    assert CacheReader(tmp_path / "c").gather(np.arange(7))["pixels"].tobytes() == rows["pixels"].tobytes()


def test_keys_too_long_for_the_reserved_room_put_the_pixels_further_with_the_same_bytes(tmp_path, monkeypatch, disk):
    rows = make_rows(20, "float16")
    rows["keys"] = [f"{'k' * 700}{i:03d}" for i in range(20)]  # 7 rows a shard: 4.9 KB of keys
    for name, direct in (("direct", shard_file._O_DIRECT), ("buffered", 0)):
        monkeypatch.setattr(shard_file, "_O_DIRECT", direct)
        with new_writer(tmp_path / name) as writer:
            assert writer._pixel_start < 7 * 700  # the room left for keys of up to 60 bytes
            for s in range(0, 20, 5):
                writer.write(
                    *[rows[k][s : s + 5] for k in ("keys", "pixels", "input_ids", "num_tokens", "labels", "captions")]
                )
    direct, buffered = shard_files(tmp_path / "direct"), shard_files(tmp_path / "buffered")
    for a, b in zip(direct, buffered, strict=True):
        assert a.read_bytes() == b.read_bytes()
        offset = _pixel_offset(a)
        assert offset % shard_file.PIXEL_ALIGNMENT == 0 and offset > 7 * 700  # past the keys, still aligned
    reader = CacheReader(tmp_path / "direct")
    assert reader.gather(np.arange(20))["pixels"].tobytes() == rows["pixels"].tobytes()
    assert reader.keys(np.arange(20)) == rows["keys"]


def test_a_lent_piece_off_the_block_alignment_has_its_shard_written_whole_with_the_same_bytes(tmp_path, monkeypatch):
    rows = make_rows(14, "float16")

    def build(path, misalign):
        with new_writer(path) as writer:
            for s in range(0, 14, 5):
                n = min(5, 14 - s)
                memory = aligned_empty((n * 1536 + 8,), np.uint8)[8 if misalign and s == 5 else 0 :][: n * 1536]
                pixels = memory.view(np.float16).reshape(n, 3, 16, 16)  # rows 8 bytes past a block: not direct
                pixels[...] = rows["pixels"][s : s + n]
                args = [rows[k][s : s + n] for k in ("keys", "input_ids", "num_tokens", "labels", "captions")]
                writer.write(args[0], pixels, *args[1:], release=lambda: None)

    build(tmp_path / "misaligned", misalign=True)
    monkeypatch.setattr(shard_file, "_O_DIRECT", 0)
    build(tmp_path / "buffered", misalign=False)
    misaligned, buffered = shard_files(tmp_path / "misaligned"), shard_files(tmp_path / "buffered")
    assert len(misaligned) == 2
    for a, b in zip(misaligned, buffered, strict=True):
        assert a.read_bytes() == b.read_bytes()
    got = CacheReader(tmp_path / "misaligned").gather(np.arange(14))["pixels"]
    assert got.tobytes() == rows["pixels"].tobytes()
