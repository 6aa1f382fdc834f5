"""The writer's side of an existing directory (`vilbert/cache/resume.py`): refuse, overwrite, lock, resume."""

from __future__ import annotations

import os
import signal
import time

import pytest

from vilbert.cache import MANIFEST_NAME, CacheReader, resume
from vilbert.errors import CacheError, UsageError

from .conftest import build_cache, make_rows, new_writer, shard_files, write_rows


def test_existing_directory_is_refused_unless_overwrite(tmp_path, cache_f16):
    path, _ = cache_f16
    with pytest.raises(UsageError) as info, new_writer(path):
        pass
    message = str(info.value)
    assert str(path) in message and "overwrite" in message and "resume" in message
    rows = build_cache(path, n=9, dtype="uint8", mode="overwrite")
    reader = CacheReader(path)
    assert len(reader) == 9 and reader.pixel_dtype == "uint8"
    assert reader.gather(range(9))["pixels"].tobytes() == rows["pixels"].tobytes()


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "LOCK_WAIT_S", 0.2)
    second = new_writer(tmp_path / "c", mode="resume")  # making a writer touches nothing
    assert not (tmp_path / "c").exists()
    with new_writer(tmp_path / "c"), pytest.raises(UsageError, match=r"another process is writing .*c \(it holds"):
        second.__enter__()
    assert not (tmp_path / "c" / ".lock").exists()
    with new_writer(tmp_path / "c", mode="resume") as again:
        assert again.rows_done == 0


def test_a_writer_waits_for_a_killed_holder_that_is_still_exiting(tmp_path):
    # After `kill -9` of a run, a forked child that kept the lock's descriptor may outlive the parent by a
    # moment; the next `--resume` waits for it instead of failing "another process is writing".
    fd = resume.lock_directory(tmp_path / "c")
    child = os.fork()
    if child == 0:  # holds the inherited lock for 0.5 s, then exits
        time.sleep(0.5)
        os._exit(0)
    resume._HELD_LOCKS.discard(fd)
    os.close(fd)  # the parent is gone; the child still holds the lock
    started = time.monotonic()
    with new_writer(tmp_path / "c", mode="resume") as writer:
        assert writer.rows_done == 0
    assert 0.3 < time.monotonic() - started < resume.LOCK_WAIT_S
    os.waitpid(child, 0)


def test_a_forked_worker_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path):
    fd = resume.lock_directory(tmp_path / "c")
    child = os.fork()
    if child == 0:  # what the decode pool's worker initializer does, then a long life
        resume.close_inherited_locks()
        time.sleep(30)
        os._exit(0)
    try:
        resume.unlock_directory(tmp_path / "c", fd)
        started = time.monotonic()
        with new_writer(tmp_path / "c", mode="resume"):
            pass
        assert time.monotonic() - started < 0.2  # no wait: the live child holds nothing
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_overwrite_refuses_a_directory_that_is_not_a_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="does not look like a cache"), new_writer(tmp_path, mode="overwrite"):
        pass
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_resume_keeps_completed_shards_and_ends_byte_identical(tmp_path):
    rows = make_rows(20, "float16")
    build_cache(tmp_path / "clean", n=20)
    path = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt), new_writer(path) as writer:
        write_rows(writer, rows, 0, 17)  # shards 0 and 1 complete (14 rows), 3 rows unflushed
        raise KeyboardInterrupt
    with new_writer(path, mode="resume") as writer:
        assert writer.rows_done == 14
        write_rows(writer, rows, writer.rows_done, 20)
    assert [f.read_bytes() for f in shard_files(path)] == [f.read_bytes() for f in shard_files(tmp_path / "clean")]
    assert not (path / ".progress.json").exists()
    assert len(CacheReader(path)) == 20


def test_resume_drops_a_damaged_shard_and_everything_after_it(tmp_path):
    rows = make_rows(20, "float16")
    path = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt), new_writer(path) as writer:
        write_rows(writer, rows, 0, 17)
        raise KeyboardInterrupt
    with open(path / "shard-00001.arrow", "r+b") as handle:
        handle.truncate(100)
    with new_writer(path, mode="resume") as writer:
        assert writer.rows_done == 7
        write_rows(writer, rows, writer.rows_done, 20)
    assert CacheReader(path).gather(range(20))["pixels"].tobytes() == rows["pixels"].tobytes()


def test_resume_of_a_finished_cache_keeps_its_full_shards(tmp_path, cache_f16):
    path, rows = cache_f16
    with new_writer(path, mode="resume") as writer:
        assert writer.rows_done == 14  # the last shard (6 rows) was partial: it is rebuilt
        assert not (path / MANIFEST_NAME).exists()
        write_rows(writer, rows, 14, 20)
    assert CacheReader(path).gather(range(20))["pixels"].tobytes() == rows["pixels"].tobytes()


def test_resume_with_other_settings_is_refused(tmp_path, cache_f16):
    path, _ = cache_f16
    with (
        pytest.raises(CacheError, match=r"different settings \(max_len: was 8, now 9"),
        new_writer(path, mode="resume", max_len=9),
    ):
        pass
