"""`write_durably`: the same bytes on disk whether O_DIRECT took them or the page cache did."""

import errno
import os

import numpy as np
import pytest

from vilbert.cache import durable
from vilbert.cache.durable import STAGING_BYTES, write_durably


def _chunks(sizes: list[int], seed: int = 0) -> list[memoryview]:
    rng = np.random.default_rng(seed)
    return [memoryview(rng.integers(0, 256, n, dtype=np.uint8)).cast("B") for n in sizes]


SIZES = {
    "empty": [],
    "one byte": [1],
    "under a block": [4095],
    "one block": [4096],
    "a block and a byte": [4096, 1],
    "odd pieces across the staging buffer": [7, 3 * 4096 + 5, STAGING_BYTES - 1, 2, 40_000, 0, STAGING_BYTES + 3],
}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_the_file_holds_exactly_the_chunks(tmp_path, sizes, direct):
    chunks = _chunks(sizes)
    path = tmp_path / "shard.arrow"
    path.write_bytes(b"x" * (3 * STAGING_BYTES))  # a longer file there before: cut, not kept
    how = write_durably(path, chunks, sum(c.nbytes for c in chunks), direct=direct)
    assert path.read_bytes() == b"".join(bytes(c) for c in chunks)
    assert how == ("direct" if direct and _takes_direct(tmp_path) else "buffered")


def test_a_file_system_refusing_o_direct_gets_the_bytes_through_the_page_cache(tmp_path, monkeypatch):
    """No file system here refuses O_DIRECT (tmpfs takes it since Linux 6.6), so the refusal is
    simulated at `os.open`; everything after it is real."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(durable.os, "open", refusing_open)
    chunks = _chunks([5000, 70_000])
    path = tmp_path / "shard.arrow"
    assert write_durably(path, chunks, 75_000) == "buffered"
    assert path.read_bytes() == b"".join(bytes(c) for c in chunks)


def test_other_errors_are_raised_not_retried(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_durably(tmp_path / "missing" / "shard.arrow", _chunks([10]), 10)
    assert not (tmp_path / "missing").exists()


def _takes_direct(directory) -> bool:
    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / ".probe")
    return True
