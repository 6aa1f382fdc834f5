"""The cache in the Arrow tools researchers use, exactly as `docs/cache-format.md` shows them.

Each test runs the snippet of the doc against a real cache (three shards) and checks the rows it
reads against `CacheReader`: same keys in the same order, same captions, same pixel bytes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from vilbert.cache import CacheReader

from .conftest import MAX_LEN, SIZE


def expected(path) -> dict:
    reader = CacheReader(path)
    rows = range(len(reader))
    got = reader.gather(np.arange(len(reader)))
    return {"keys": reader.keys(rows), "captions": reader.captions(rows), **got}


@pytest.mark.parametrize("fixture", ["cache_f16", "cache_u8"])
def test_pyarrow_dataset_opens_the_cache_directory_without_arguments(fixture, request):
    path, _ = request.getfixturevalue(fixture)
    table = ds.dataset(path, format="arrow").to_table()  # the doc's line
    want = expected(path)
    assert table.column_names == ["key", "pixels", "input_ids", "num_tokens", "label", "caption"]
    assert table.column("key").to_pylist() == want["keys"]  # shard files sort in row order
    assert table.column("caption").to_pylist() == want["captions"]
    pixels = table.column("pixels").combine_chunks().values.to_numpy(zero_copy_only=False)
    assert pixels.tobytes() == want["pixels"].tobytes()
    ids = table.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, MAX_LEN)
    np.testing.assert_array_equal(ids, want["input_ids"])


def test_polars_scans_and_reads_the_shards(cache_f16):
    pl = pytest.importorskip("polars")
    path, _ = cache_f16
    want = expected(path)
    with pytest.raises(pl.exceptions.PolarsError):  # the doc says why it takes a glob
        pl.scan_ipc(path).collect()
    frame = pl.scan_ipc(path / "*.arrow").select("key", "caption", "num_tokens").collect()  # the doc's line
    assert frame["key"].to_list() == want["keys"]
    assert frame["caption"].to_list() == want["captions"]
    np.testing.assert_array_equal(frame["num_tokens"].to_numpy(), want["num_tokens"])
    shard = pl.read_ipc(path / "shard-00000.arrow")  # the doc's line
    rows = shard.height
    assert shard["pixels"].dtype == pl.Array(pl.Float16, 3 * SIZE * SIZE)
    assert shard["pixels"].to_numpy().tobytes() == want["pixels"][:rows].tobytes()


def test_hugging_face_datasets_reads_a_shard_and_the_whole_cache(cache_f16):
    datasets = pytest.importorskip("datasets")
    path, _ = cache_f16
    want = expected(path)
    shard = path / "shard-00000.arrow"
    # `Dataset.from_file` reads the Arrow *stream* format only; our shards are IPC *files* (what
    # pyarrow.dataset and polars' scan need), so the doc gives this one line instead:
    one = datasets.Dataset(pa.ipc.open_file(pa.memory_map(str(shard))).read_all())
    rows = one.num_rows
    assert one["key"] == want["keys"][:rows]
    pixels = one.with_format("numpy")[:rows]["pixels"]  # float16 comes back as float32 (exactly)
    np.testing.assert_array_equal(pixels, want["pixels"][:rows].reshape(rows, -1).astype(np.float32))
    shards = sorted(path.glob("*.arrow"))
    whole = datasets.concatenate_datasets(
        [datasets.Dataset(pa.ipc.open_file(pa.memory_map(str(s))).read_all()) for s in shards]
    )
    assert whole["key"] == want["keys"] and whole["caption"] == want["captions"]
    with pytest.raises(pa.ArrowInvalid):  # the doc says why: from_file reads stream files only
        datasets.Dataset.from_file(str(shard))


def test_hugging_face_datasets_maps_the_shard_without_copying_it(cache_f16):
    datasets = pytest.importorskip("datasets")
    path, _ = cache_f16
    shard = path / "shard-00000.arrow"
    source = pa.memory_map(str(shard))
    one = datasets.Dataset(pa.ipc.open_file(source).read_all())
    pixels = one.data.column("pixels").chunk(0).values.buffers()[1]
    source.seek(0)
    mapped = source.read_buffer()  # the whole file, as mapped
    assert mapped.address <= pixels.address < mapped.address + mapped.size


def test_duckdb_queries_the_cache_through_pyarrow(cache_f16, cache_u8):
    duckdb = pytest.importorskip("duckdb")
    path, _ = cache_f16
    want = expected(path)
    # DuckDB has no float16: a float16 cache is queried without its pixels (or with them cast).
    scan = ds.dataset(path, format="arrow").scanner(columns=["key", "num_tokens", "caption"])  # noqa: F841
    ((count, tokens, first),) = duckdb.sql("select count(*), sum(num_tokens), min(key) from scan").fetchall()
    assert (count, tokens, first) == (len(want["keys"]), int(want["num_tokens"].sum()), min(want["keys"]))
    path_u8, _ = cache_u8
    want_u8 = expected(path_u8)
    cache = ds.dataset(path_u8, format="arrow")  # noqa: F841 - a uint8 cache: every column
    rows = duckdb.sql("select key, pixels[1], input_ids[1] from cache order by key").fetchall()
    order = np.argsort(want_u8["keys"])
    assert [r[0] for r in rows] == [want_u8["keys"][i] for i in order]
    assert [r[1] for r in rows] == want_u8["pixels"].reshape(len(order), -1)[order, 0].tolist()
    assert [r[2] for r in rows] == want_u8["input_ids"][order, 0].tolist()
