"""CacheWriter: byte-exact round trips, determinism, atomicity, bad batches and arguments (resume: test_resume.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vilbert.cache import MANIFEST_NAME, CacheReader, normalization
from vilbert.errors import CacheError, UsageError

from .conftest import MAX_LEN, SIZE, build_cache, make_rows, new_writer, shard_files, write_rows


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_round_trip_is_byte_exact_across_shard_boundaries(tmp_path, dtype):
    rows = build_cache(tmp_path / "c", n=20, dtype=dtype, chunk=5)  # 7 rows per shard: 7 + 7 + 6
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 20 and reader.num_shards == 3
    got = reader.gather(np.arange(20))
    assert got["pixels"].dtype == np.dtype(dtype)
    assert got["pixels"].tobytes() == rows["pixels"].tobytes()
    assert got["input_ids"].tobytes() == rows["input_ids"].tobytes()
    np.testing.assert_array_equal(got["num_tokens"], rows["num_tokens"])
    np.testing.assert_array_equal(got["label"], rows["labels"])
    assert reader.keys(range(20)) == rows["keys"]
    assert reader.captions(range(20)) == rows["captions"]


def test_each_shard_opens_in_plain_pyarrow(cache_f16):
    path, rows = cache_f16
    total = 0
    for file in shard_files(path):
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_file(source).read_all()
        assert table.column_names == ["key", "pixels", "input_ids", "num_tokens", "label", "caption"]
        assert table.schema.field("pixels").type == pa.list_(pa.float16(), 3 * SIZE * SIZE)
        assert table.schema.field("input_ids").type == pa.list_(pa.int32(), MAX_LEN)
        assert table.schema.metadata[b"vilbert.layout"] == b"CHW"
        total += table.num_rows
    assert total == 20


def test_output_is_deterministic_whatever_the_batching(tmp_path):
    build_cache(tmp_path / "a", n=20, chunk=3)
    build_cache(tmp_path / "b", n=20, chunk=20)
    a, b = shard_files(tmp_path / "a"), shard_files(tmp_path / "b")
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b, strict=True):
        assert fa.read_bytes() == fb.read_bytes()
    shards_a = CacheReader(tmp_path / "a").manifest.shards
    assert shards_a == CacheReader(tmp_path / "b").manifest.shards


def test_rows_per_shard_follow_target_bytes(tmp_path):
    # float16 row: 3*16*16*2 = 1536 + 4*8 + 4 + 8 + 96 (string estimate) = 1676 bytes
    build_cache(tmp_path / "c", n=20, rows_per_shard=None, target_shard_bytes=1676 * 6)
    manifest = CacheReader(tmp_path / "c").manifest
    assert manifest.rows_per_shard == 6
    assert [s.rows for s in manifest.shards] == [6, 6, 6, 2]


def test_uint8_input_is_normalized_for_a_float16_cache(tmp_path):
    rows = make_rows(4, "uint8")
    with new_writer(tmp_path / "c", "float16", normalization="imagenet") as writer:
        writer.write(
            rows["keys"], rows["pixels"], rows["input_ids"], rows["num_tokens"], rows["labels"], rows["captions"]
        )
    got = CacheReader(tmp_path / "c").gather(range(4))["pixels"]
    norm = normalization("imagenet")
    mean = np.array(norm.mean).reshape(3, 1, 1)
    std = np.array(norm.std).reshape(3, 1, 1)
    expected = ((rows["pixels"] / 255.0 - mean) / std).astype(np.float16)  # float64, rounded once
    assert got.tobytes() == expected.tobytes()


def test_an_exception_leaves_no_manifest_and_no_temp_files(tmp_path):
    rows = make_rows(20, "float16")
    path = tmp_path / "c"
    with pytest.raises(RuntimeError), new_writer(path) as writer:
        writer.write(
            rows["keys"][:10],
            rows["pixels"][:10],
            rows["input_ids"][:10],
            rows["num_tokens"][:10],
            rows["labels"][:10],
            rows["captions"][:10],
        )
        raise RuntimeError("producer crashed")
    assert not (path / MANIFEST_NAME).exists()
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*.tmp"))
    with pytest.raises(CacheError, match=r"not a cache \(no _manifest.json\)"):
        CacheReader(path)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"pixels": np.zeros((4, 3, SIZE, SIZE + 1), np.float16)}, "pixels: expected shape [4, 3, 16, 16]"),
        ({"pixels": np.zeros((4, 3, SIZE, SIZE), np.float32)}, "pixels dtype float32 does not match"),
        ({"labels": None}, "has_labels=True but labels were not given"),
        ({"num_tokens": np.full(4, MAX_LEN + 1)}, "num_tokens must be in [0, max_len + 1=9), got 9..9"),
        ({"captions": ["only one"]}, "captions: expected 4 strings"),
        ({"input_ids": np.full((4, MAX_LEN), 12)}, "input_ids must be in [0, vocab_size=12), got 12..12"),
    ],
)
def test_bad_batches_are_refused_clearly(tmp_path, change, fragment):
    rows = make_rows(4, "float16")
    rows.update(change)
    with pytest.raises(UsageError) as info, new_writer(tmp_path / "c") as writer:
        writer.write(
            rows["keys"], rows["pixels"], rows["input_ids"], rows["num_tokens"], rows["labels"], rows["captions"]
        )
    assert fragment in str(info.value)
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"pixel_dtype": "float32"}, "unknown pixel_dtype 'float32'; valid: float16, uint8"),
        ({"normalization": "imagenett"}, "unknown normalization 'imagenett'; valid: imagenet, half, clip"),
        ({"special_token_ids": {"pad": 0}}, "special_token_ids lacks unk, cls, sep, mask"),
        ({"mode": "append"}, "unknown mode 'append'"),
        ({"split": "a/b"}, "split must be a non-empty name without '/'"),
    ],
)
def test_bad_arguments_are_refused_before_any_file_is_touched(tmp_path, override, fragment):
    with pytest.raises(UsageError) as info:
        new_writer(tmp_path / "c", **override)
    assert fragment in str(info.value)
    assert not (tmp_path / "c").exists()


def test_a_writer_writes_only_inside_its_with_block(tmp_path):
    rows = make_rows(3, "float16")
    writer = new_writer(tmp_path / "c")
    with pytest.raises(UsageError, match="is not open; use it in a `with` block"):
        write_rows(writer, rows, 0, 3)
    with writer:
        write_rows(writer, rows, 0, 3)
    with pytest.raises(UsageError, match="already closed"):
        write_rows(writer, rows, 0, 3)
    with pytest.raises(UsageError, match="already entered"), writer:
        pass
    assert len(CacheReader(tmp_path / "c")) == 3


def test_finish_records_extra_provenance(tmp_path):
    rows = make_rows(3, "float16")
    with new_writer(tmp_path / "c") as writer:
        write_rows(writer, rows, 0, 3)
        manifest = writer.finish(extra={"skipped": {"undecodable": 2}})
    assert manifest.extra == {"skipped": {"undecodable": 2}}
    assert CacheReader(tmp_path / "c").manifest.extra == {"skipped": {"undecodable": 2}}


def test_a_failed_shard_commit_fails_the_build_and_keeps_the_earlier_shards(tmp_path, monkeypatch):
    """Shards are synced and renamed on the writer's commit thread; its errors reach the producer."""
    import vilbert.cache.writer as writer_module

    calls = []

    def failing_second_commit(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer_module, "_drop_from_page_cache", failing_second_commit)
    rows = make_rows(20, "float16")
    path = tmp_path / "c"
    with pytest.raises(OSError, match="Input/output error"), new_writer(path) as writer:
        write_rows(writer, rows, 0, 20)
    assert not (path / MANIFEST_NAME).exists()
    assert [f.name for f in shard_files(path)] == ["shard-00000.arrow"]
    assert not list(path.glob(".shard-*.tmp"))
    monkeypatch.undo()
    with new_writer(path, mode="resume") as writer:
        assert writer.rows_done == 7
        write_rows(writer, rows, writer.rows_done, 20)
    build_cache(tmp_path / "clean", n=20)
    assert [f.read_bytes() for f in shard_files(path)] == [f.read_bytes() for f in shard_files(tmp_path / "clean")]


def _lend_rows(writer, rows: dict, chunk: int, released: list[int], detach_after: int | None = None) -> list:
    """Write `rows` in chunks whose pixels are lent (copies the test owns); returns the copies."""
    lent = []
    for s in range(0, len(rows["keys"]), chunk):
        pixels = rows["pixels"][s : s + chunk].copy()
        lent.append(pixels)
        writer.write(
            rows["keys"][s : s + chunk],
            pixels,
            rows["input_ids"][s : s + chunk],
            rows["num_tokens"][s : s + chunk],
            rows["labels"][s : s + chunk],
            rows["captions"][s : s + chunk],
            release=lambda s=s: released.append(s),
        )
        if detach_after is not None and s == detach_after:
            writer.detach()
    return lent


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_lent_pixels_give_the_same_bytes_and_are_released_once_written(tmp_path, dtype):
    copied = build_cache(tmp_path / "copied", n=20, dtype=dtype, chunk=5)  # 7 rows per shard: 7 + 7 + 6
    released: list[int] = []
    with new_writer(tmp_path / "lent", dtype) as writer:
        lent = _lend_rows(writer, make_rows(20, dtype), 5, released)
        # Shards hold rows 0-6, 7-13 and 14-19: the third is written by finish, so the writes of
        # rows 10-14 (row 14) and 15-19 are still lent.
        assert released == [0, 5]
        for pixels in lent[:2]:  # a released lender may reuse its memory: the shards hold copies
            pixels[...] = 0
    assert released == [0, 5, 10, 15]
    a, b = shard_files(tmp_path / "copied"), shard_files(tmp_path / "lent")
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert CacheReader(tmp_path / "lent").gather(np.arange(20))["pixels"].tobytes() == copied["pixels"].tobytes()


def test_detach_copies_lent_rows_and_releases_them_at_once(tmp_path):
    rows = make_rows(20, "float16")
    build_cache(tmp_path / "copied", n=20, chunk=5)
    released: list[int] = []
    with new_writer(tmp_path / "lent") as writer:
        lent = _lend_rows(writer, rows, 5, released, detach_after=15)
        # detach after the last write: row 14 (lent by the write of 10-14) and rows 15-19 are copied.
        assert released == [0, 5, 10, 15]
        lent[3][...] = 0  # the lender's memory no longer matters
        assert writer.detach() == 0
    assert [f.read_bytes() for f in shard_files(tmp_path / "copied")] == [
        f.read_bytes() for f in shard_files(tmp_path / "lent")
    ]


def test_an_aborted_build_does_not_release_lent_rows(tmp_path):
    released: list[int] = []
    with pytest.raises(RuntimeError), new_writer(tmp_path / "c") as writer:
        _lend_rows(writer, make_rows(5, "float16"), 5, released)
        raise RuntimeError("producer failed")
    assert released == [] and not (tmp_path / "c" / MANIFEST_NAME).exists()


def test_lent_rows_are_copied_if_the_ipc_writer_hands_over_copies(tmp_path, monkeypatch):
    from vilbert.cache import writer as writer_module

    build_cache(tmp_path / "copied", n=20, chunk=5)
    original = writer_module._CollectingSink.write
    monkeypatch.setattr(writer_module._CollectingSink, "write", lambda self, data: original(self, bytes(data)))
    released: list[int] = []
    with new_writer(tmp_path / "lent") as writer:
        _lend_rows(writer, make_rows(20, "float16"), 5, released)
    assert released == [0, 5, 10, 15]
    assert [f.read_bytes() for f in shard_files(tmp_path / "copied")] == [
        f.read_bytes() for f in shard_files(tmp_path / "lent")
    ]
