"""The writer's side of an existing directory (`vilbert/cache/resume.py`): refuse, overwrite, lock, resume."""

from __future__ import annotations

import pytest

from vilbert.cache import MANIFEST_NAME, CacheReader
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


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path):
    second = new_writer(tmp_path / "c", mode="resume")  # making a writer touches nothing
    assert not (tmp_path / "c").exists()
    with new_writer(tmp_path / "c"), pytest.raises(UsageError, match=r"another process is writing .*c \(it holds"):
        second.__enter__()
    assert not (tmp_path / "c" / ".lock").exists()
    with new_writer(tmp_path / "c", mode="resume") as again:
        assert again.rows_done == 0


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
