"""`CacheDataset` in plain torch loops: zero-copy rows, one-gather batches through `batch_size=None`, the
default collate, worker processes, and the same range checks as the reader."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from vilbert.cache import CacheDataset, CacheReader
from vilbert.errors import CacheError

from .conftest import build_cache, corrupt_in_place
from .test_reader import mapped_ranges


def _expected(rows: dict, indices) -> dict[str, np.ndarray]:
    return {"pixels": rows["pixels"][indices], "input_ids": rows["input_ids"][indices],
            "num_tokens": rows["num_tokens"][indices], "label": rows["labels"][indices]}  # fmt: skip


@pytest.mark.parametrize("fixture", ["cache_u8", "cache_f16"])
def test_a_row_is_zero_copy_views_of_the_mapped_shards(request, fixture) -> None:
    path, rows = request.getfixturevalue(fixture)
    dataset = CacheDataset(path)
    assert len(dataset) == 20 and set(dataset[0]) == {"pixels", "input_ids", "num_tokens", "label"}
    for index in (0, 6, 7, 19, -1):
        row = dataset[index]
        for name, array in _expected(rows, index % 20).items():
            np.testing.assert_array_equal(row[name].numpy(), array)
        if sys.platform == "linux":
            address = row["pixels"].data_ptr()
            shard = CacheReader(path).locate(np.array([index % 20]))[0][0]
            assert any(low <= address < high for low, high in mapped_ranges(dataset.reader.shard_paths[shard]))
    with pytest.raises(IndexError):
        dataset[20]
    assert torch.equal(dataset[torch.tensor(3)]["input_ids"], dataset[3]["input_ids"])


def test_a_plain_dataloader_collates_rows(cache_u8) -> None:
    path, rows = cache_u8
    loader = DataLoader(CacheDataset(path), batch_size=8, shuffle=False)
    batches = list(loader)
    assert [len(b["pixels"]) for b in batches] == [8, 8, 4]
    whole = {name: torch.cat([b[name] for b in batches]).numpy() for name in batches[0]}
    for name, array in _expected(rows, slice(None)).items():
        np.testing.assert_array_equal(whole[name], array)
    assert batches[0]["pixels"].dtype == torch.uint8 and batches[0]["input_ids"].dtype == torch.int32


def test_batch_size_none_gathers_whole_batches_in_sampler_order(cache_f16) -> None:
    path, rows = cache_f16
    dataset = CacheDataset(path)

    def sampler() -> BatchSampler:
        return BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), 6, drop_last=False)

    order = list(sampler())
    loader = DataLoader(dataset, batch_size=None, sampler=sampler())
    for indices, batch in zip(order, loader, strict=True):
        assert batch["pixels"].shape == (len(indices), 3, 16, 16)
        for name, array in _expected(rows, indices).items():
            np.testing.assert_array_equal(batch[name].numpy(), array)


def test_worker_processes_reopen_the_maps(cache_u8) -> None:
    path, rows = cache_u8
    sampler = BatchSampler(SequentialSampler(range(20)), 5, drop_last=False)
    loader = DataLoader(CacheDataset(path), batch_size=None, sampler=sampler, num_workers=2)
    got = torch.cat([b["input_ids"] for b in loader]).numpy()
    np.testing.assert_array_equal(got, rows["input_ids"])


def test_a_corrupt_row_is_refused_naming_shard_and_row(tmp_path: Path) -> None:
    build_cache(tmp_path / "c", dtype="uint8")
    dataset = CacheDataset(tmp_path / "c")
    shard = dataset.reader.shard_paths[1]  # rows 7..13
    corrupt_in_place(shard, "input_ids", 2, np.int32(10_000))
    dataset = CacheDataset(tmp_path / "c")
    assert dataset[8]["num_tokens"] >= 2
    for index in (9, [3, 9]):
        with pytest.raises(CacheError, match=f"{shard.name} row 2"):
            dataset[index]


def test_keys_captions_and_normalization(cache_f16) -> None:
    path, rows = cache_f16
    dataset = CacheDataset([path])
    assert dataset.keys([0, 19]) == [rows["keys"][0], rows["keys"][19]]
    assert dataset.captions([2]) == [rows["captions"][2]]
    assert dataset.pixel_dtype == "float16" and dataset.normalization.mean == (0.5, 0.5, 0.5)
