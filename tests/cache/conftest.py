"""Tiny synthetic caches for the cache tests: real Arrow files in tmp_path, 16x16 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from vilbert.cache import CacheSpec, CacheWriter

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "left", "of"]
SIZE = 16
MAX_LEN = 8


def tokenizer_json(extra_word: str | None = None) -> str:
    words = WORDS + ([extra_word] if extra_word else [])
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer.to_str()


def make_rows(n: int, dtype: str, *, seed: int = 0, start: int = 0) -> dict:
    """n synthetic rows whose content depends only on (seed, row number)."""
    rng = np.random.default_rng([seed, start])
    if dtype == "uint8":
        pixels = rng.integers(0, 256, size=(n, 3, SIZE, SIZE), dtype=np.uint8)
    else:
        pixels = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float16)
    num_tokens = rng.integers(2, MAX_LEN + 1, size=n).astype(np.int32)
    input_ids = rng.integers(5, len(WORDS), size=(n, MAX_LEN)).astype(np.int32)
    input_ids[np.arange(MAX_LEN)[None, :] >= num_tokens[:, None]] = SPECIALS["pad"]
    return {
        "keys": [f"img{start + i:05d}" for i in range(n)],
        "pixels": pixels,
        "input_ids": input_ids,
        "num_tokens": num_tokens,
        "labels": rng.integers(0, 2, size=n).astype(np.int64),
        "captions": [f"caption {start + i} a red circle" for i in range(n)],
    }


def writer_spec(dtype: str = "float16", **overrides) -> CacheSpec:
    kwargs = dict(
        split="train",
        image_size=SIZE,
        pixel_dtype=dtype,
        normalization="half",
        max_len=MAX_LEN,
        tokenizer_json=tokenizer_json(),
        special_token_ids=SPECIALS,
        vocab_size=len(WORDS),
        has_labels=True,
        has_captions=True,
        command="pytest",
        rows_per_shard=7,
    )
    kwargs.update(overrides)
    return CacheSpec(**kwargs)


def new_writer(path: Path, dtype: str = "float16", *, mode: str = "create", **overrides) -> CacheWriter:
    """A writer of the test spec (enter it to write)."""
    return CacheWriter(path, writer_spec(dtype, **overrides), mode=mode)


def build_cache(
    path: Path, n: int = 20, dtype: str = "float16", chunk: int = 5, *, mode: str = "create", **overrides
) -> dict:
    """Write n rows in chunks of `chunk`; returns the rows written."""
    rows = make_rows(n, dtype)
    with new_writer(path, dtype, mode=mode, **overrides) as writer:
        for s in range(0, n, chunk):
            writer.write(
                rows["keys"][s : s + chunk],
                rows["pixels"][s : s + chunk],
                rows["input_ids"][s : s + chunk],
                rows["num_tokens"][s : s + chunk],
                rows["labels"][s : s + chunk],
                rows["captions"][s : s + chunk],
            )
    return rows


@pytest.fixture
def cache_f16(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "cache-f16"
    return path, build_cache(path, dtype="float16")


@pytest.fixture
def cache_u8(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "cache-u8"
    return path, build_cache(path, dtype="uint8")


def corrupt_in_place(shard: Path, column: str, row: int, value: np.generic) -> None:
    """Overwrite the first element of `column` at `row` with `value`, in place: same size, so only a
    checksum or a range check can notice."""
    import os

    import pyarrow as pa

    with pa.memory_map(str(shard)) as source:
        whole = source.read_buffer()
        batch = pa.ipc.open_file(whole).get_batch(0)
        array = batch.column(column)
        if isinstance(array, pa.FixedSizeListArray):
            values, index = array.values, (array.offset + row) * array.type.list_size
        else:
            values, index = array, row
        offset = values.buffers()[1].address - whole.address + (values.offset + index) * value.itemsize
    fd = os.open(shard, os.O_WRONLY)
    try:
        os.pwrite(fd, value.tobytes(), offset)
    finally:
        os.close(fd)


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("shard-*.arrow"))


def write_rows(writer: CacheWriter, rows: dict, start: int, stop: int, chunk: int = 4) -> None:
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        writer.write(
            rows["keys"][s:e],
            rows["pixels"][s:e],
            rows["input_ids"][s:e],
            rows["num_tokens"][s:e],
            rows["labels"][s:e],
            rows["captions"][s:e],
        )
