"""CacheReader: zero-copy views, gather, several caches, and clear refusals of broken caches."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vilbert.cache import CacheReader, normalization, verify_cache
from vilbert.errors import CacheError, UsageError

from .conftest import build_cache, new_writer, tokenizer_json


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges where this process has `file` memory-mapped (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(file.resolve()):
            low, high = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((low, high))
    return ranges


@pytest.mark.parametrize("column", ["pixels", "input_ids", "num_tokens", "label"])
def test_column_views_are_zero_copy_over_the_mapped_file(cache_f16, column):
    path, rows = cache_f16
    reader = CacheReader(path)
    expected = {
        "pixels": rows["pixels"],
        "input_ids": rows["input_ids"],
        "num_tokens": rows["num_tokens"],
        "label": rows["labels"],
    }[column]
    for shard, (start, view) in enumerate(zip(reader.starts, reader.views(column), strict=False)):
        np.testing.assert_array_equal(view, expected[start : start + len(view)])
        arrow_buffer = reader._shards[shard].batch.column(column)
        arrow_buffer = (arrow_buffer.values if hasattr(arrow_buffer, "values") else arrow_buffer).buffers()[1]
        assert np.shares_memory(view, np.frombuffer(arrow_buffer, dtype=np.uint8))
        assert not view.flags.writeable and not view.flags.owndata
        if sys.platform == "linux":
            address = view.__array_interface__["data"][0]
            assert any(low <= address < high for low, high in mapped_ranges(reader.shard_paths[shard]))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
def test_an_open_reader_holds_no_file_descriptors(tmp_path):
    build_cache(tmp_path / "c", n=20, rows_per_shard=2)  # 10 shards
    before = len(list(Path("/proc/self/fd").iterdir()))
    reader = CacheReader(tmp_path / "c")
    assert reader.num_shards == 10
    assert len(list(Path("/proc/self/fd").iterdir())) == before
    assert reader.gather([19])["num_tokens"].shape == (1,)


def test_torch_views_share_the_mapped_memory(cache_u8):
    path, rows = cache_u8
    reader = CacheReader(path)
    views, tensors = reader.views("pixels"), reader.torch_views("pixels")
    for view, tensor in zip(views, tensors, strict=True):
        assert tensor.data_ptr() == view.__array_interface__["data"][0]
        assert tensor.dtype == torch.uint8 and tuple(tensor.shape[1:]) == (3, 16, 16)
    assert torch.equal(torch.cat(tensors), torch.from_numpy(rows["pixels"]))


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_gather_in_any_order_with_and_without_buffers(tmp_path, dtype):
    rows = build_cache(tmp_path / "c", n=20, dtype=dtype)
    reader = CacheReader(tmp_path / "c")
    rng = np.random.default_rng(1)
    buffers = reader.allocate(8)
    for indices in (rng.permutation(20)[:8], np.array([3, 1, 2, 0, 6]), np.array([19, 0, 19, 8]), np.arange(14, 20)):
        for out in (None, buffers):
            got = reader.gather(indices, out=out)
            assert got["pixels"].tobytes() == rows["pixels"][indices].tobytes()
            np.testing.assert_array_equal(got["input_ids"], rows["input_ids"][indices])
            np.testing.assert_array_equal(got["num_tokens"], rows["num_tokens"][indices])
            np.testing.assert_array_equal(got["label"], rows["labels"][indices])
            if out is not None:
                assert np.shares_memory(got["pixels"], buffers["pixels"])
    with pytest.raises(IndexError, match="row 20 out of range for a cache of 20 rows"):
        reader.gather([0, 20])


def test_metadata_and_tokenizer(cache_f16):
    path, _ = cache_f16
    reader = CacheReader(path)
    assert reader.pixel_dtype == "float16" and reader.has_labels and reader.max_len == 8
    assert reader.normalization == normalization("half")
    assert reader.tokenizer().encode("a red circle").ids == [5, 6, 8]
    assert "20 rows, 3 shards" in repr(reader)


def test_several_caches_read_as_one(tmp_path):
    a = build_cache(tmp_path / "a", n=20)
    build_cache(tmp_path / "b", n=9)
    reader = CacheReader([tmp_path / "a", tmp_path / "b"])
    assert len(reader) == 29 and reader.num_shards == 5
    assert reader.gather([0, 19])["pixels"].tobytes() == a["pixels"][[0, 19]].tobytes()
    assert reader.gather([20])["pixels"].tobytes() == a["pixels"][[0]].tobytes()  # same seed: same rows


def test_caches_with_different_tokenizers_are_refused_together(tmp_path):
    build_cache(tmp_path / "a", n=7)
    build_cache(tmp_path / "b", n=7, tokenizer_json=tokenizer_json(extra_word="triangle"))
    with pytest.raises(CacheError, match="different tokenizers"):
        CacheReader([tmp_path / "a", tmp_path / "b"])


def test_a_shard_from_a_cache_with_another_tokenizer_is_refused(tmp_path):
    build_cache(tmp_path / "a", n=20)
    build_cache(tmp_path / "b", n=20, tokenizer_json=tokenizer_json(extra_word="triangle"))
    # Copy b's second shard into a and make a's manifest agree on its size and checksum.
    shutil.copy(tmp_path / "b" / "shard-00001.arrow", tmp_path / "a" / "shard-00001.arrow")
    manifest_a = json.loads((tmp_path / "a" / "_manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "_manifest.json").read_text())
    manifest_a["shards"][1] = manifest_b["shards"][1]
    (tmp_path / "a" / "_manifest.json").write_text(json.dumps(manifest_a))
    with pytest.raises(
        CacheError,
        match=r"shard-00001.arrow was built with a different tokenizer_fingerprint "
        r"\(shards built with different tokenizers\)",
    ):
        CacheReader(tmp_path / "a")


def test_missing_manifest_is_not_a_cache(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match=r"not a cache \(no _manifest.json\): .*empty"):
        CacheReader(tmp_path / "empty")
    with pytest.raises(CacheError, match="not a cache"):
        CacheReader(tmp_path / "nowhere")


def test_unknown_format_version_is_refused(cache_f16):
    path, _ = cache_f16
    manifest = json.loads((path / "_manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CacheError, match="unknown format 'vilbert-cache' version 99; this vilbert reads 'vilbert-cache' version 2"
    ):
        CacheReader(path)


def test_a_version_1_cache_is_refused_with_a_rebuild_hint_and_can_be_overwritten(tmp_path, cache_f16):
    """Version 1 kept `manifest.json` and `tokenizer.json` beside the shards (what Arrow dataset
    readers trip on); such a directory is refused by name, and `--overwrite` replaces it."""
    path, _ = cache_f16
    manifest = json.loads((path / "_manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"format_version": 1}))
    (path / "tokenizer.json").write_bytes((path / "_tokenizer.json").read_bytes())
    (path / "_manifest.json").unlink()
    (path / "_tokenizer.json").unlink()
    with pytest.raises(
        CacheError,
        match=r"cache of format version 1 \(manifest.json\); this vilbert reads version 2: "
        r"rebuild it with `vilbert preprocess ... --overwrite`",
    ):
        CacheReader(path)
    with pytest.raises(CacheError, match="version 1"):
        verify_cache(path)
    with pytest.raises(UsageError, match="a cache of an older format version"), new_writer(path):
        pass
    with (
        pytest.raises(CacheError, match="older format version; pass mode='overwrite'"),
        new_writer(path, mode="resume"),
    ):
        pass
    build_cache(path, n=9, mode="overwrite")
    assert sorted(p.name for p in path.iterdir()) == [
        "_manifest.json",
        "_tokenizer.json",
        "shard-00000.arrow",
        "shard-00001.arrow",
    ]
    assert len(CacheReader(path)) == 9


def test_truncated_and_missing_shards_are_refused(cache_f16):
    path, _ = cache_f16
    shard = path / "shard-00002.arrow"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 10)
    with pytest.raises(
        CacheError,
        match=rf"shard-00002.arrow is truncated: {size - 10} bytes on disk, "
        rf"the manifest says {size}",
    ):
        CacheReader(path)
    shard.unlink()
    with pytest.raises(CacheError, match="missing shard .*shard-00002.arrow"):
        CacheReader(path)


def test_a_replaced_tokenizer_file_is_refused(cache_f16):
    path, _ = cache_f16
    (path / "_tokenizer.json").write_text(tokenizer_json(extra_word="triangle"))
    with pytest.raises(CacheError, match="does not match the manifest's tokenizer fingerprint"):
        CacheReader(path)


def test_check_compatible_refuses_another_normalization(cache_f16, cache_u8):
    reader = CacheReader(cache_f16[0])
    reader.check_compatible(expected_normalization="half", expected_max_len=8, expected_image_size=16)
    reader.check_compatible(expected_normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    with pytest.raises(CacheError) as info:
        reader.check_compatible(expected_normalization="imagenet")
    message = str(info.value)
    assert "normalized with 'half' (mean=(0.5, 0.5, 0.5)" in message
    assert "model expects 'imagenet' (mean=(0.485, 0.456, 0.406)" in message
    assert "--normalization imagenet" in message
    with pytest.raises(CacheError, match="tokenizer fingerprint 'sha256:"):
        reader.check_compatible(expected_tokenizer_fingerprint="sha256:0")
    with pytest.raises(CacheError, match="max_len 8, but the model expects 16"):
        reader.check_compatible(expected_max_len=16)
    # uint8 pixels are normalized on the device with the model's own mean/std: no mismatch possible.
    CacheReader(cache_u8[0]).check_compatible(expected_normalization="imagenet")
