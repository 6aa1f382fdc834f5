"""preprocess --format parquet: img2dataset's parquet output and a Hugging Face image dataset.

Every good row must reach the cache with its caption byte-exact and its pixels equal to our own
decode of the same bytes; a failed-status row, a corrupt image, a null caption, an unreadable file
are counted skips naming file and row; a missing column is one clear error listing the columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vilbert.cache import CacheReader, verify_cache
from vilbert.errors import UsageError
from vilbert.pipeline.images import decode_resize
from vilbert.pipeline.parquet import ParquetSource
from vilbert.pipeline.preprocess import REPORT_NAME, PreprocessOptions, preprocess
from vilbert.pipeline.sources import iter_captions, open_source
from vilbert.pipeline.text import train_wordpiece

from .img2dataset_layout import Row, key_of, photo, write_hugging_face_parquet, write_img2dataset_parquet

SIZE = 32
WORDS = "a small big red blue green circle square left right of above below the near photo".split()  # noqa: SIM905


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(2, 9)))


def cache_rows(out: Path, splits) -> dict[str, tuple]:
    rows = {}
    for split in splits:
        reader = CacheReader(out / split)
        assert verify_cache(out / split).ok
        everything = range(len(reader))
        got = reader.gather(np.arange(len(reader)))
        labels = got.get("label", [None] * len(reader))
        for key, text, image, label in zip(
            reader.keys(everything), reader.captions(everything), got["pixels"], labels, strict=True
        ):
            rows[key] = (text, image, label)
    return rows


def test_img2dataset_parquet_output_with_failed_rows_and_traps(tmp_path, run_cli):
    rng = np.random.default_rng(2)
    files = []
    good = []
    for shard in range(2):
        rows = [Row(key_of(shard, i), caption(rng), photo(rng, 40 + i, 56)) for i in range(250)]  # 3 writes each
        rows[4].status, rows[4].error, rows[4].image = "failed_to_download", "HTTP 404", None
        rows[120].status, rows[120].error = "failed_to_resize", "image too small"
        rows[17].image = b"\xff\xd8\xff not a jpeg"
        rows[30].caption = None
        rows[31].caption = "caf\u00e9  \u2014 \U0001f431 "
        files.append(write_img2dataset_parquet(tmp_path / "i2d", shard, rows))
        good += [r for i, r in enumerate(rows) if i not in (4, 120, 17, 30)]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 3  # img2dataset writes 100 rows a time
    tokenizer = tmp_path / "tokenizer.json"
    train_wordpiece(iter_captions([tmp_path / "i2d"]), vocab_size=60).save(str(tokenizer))
    out = tmp_path / "cache"
    result = run_cli(
        "preprocess", "--format", "parquet", str(tmp_path / "i2d"), "--to-mmap", str(out),
        "--tokenizer", str(tokenizer), "--image-size", str(SIZE), "--pixel-dtype", "uint8", "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["skipped"] == {"failed-status": 4, "no-caption": 2, "undecodable": 2}
    assert report["examples"]["failed-status"][0] == f"{files[0]}:row 4: status=failed_to_download: HTTP 404"
    assert report["examples"]["undecodable"][0].startswith(f"{files[0]}:row 17: ")
    rows = cache_rows(out, report["splits"])
    assert sorted(rows) == sorted(r.key for r in good)
    for row in good:
        text, image, _ = rows[row.key]
        assert text.encode() == row.caption.encode()
        np.testing.assert_array_equal(image, decode_resize(row.image, size=SIZE).transpose(2, 0, 1))


def test_hugging_face_image_dataset_with_labels(tmp_path):
    pytest.importorskip("datasets")
    rng = np.random.default_rng(4)
    images = [photo(rng, 64, 48, fmt="png" if i % 3 == 0 else "jpeg") for i in range(12)]
    texts = [caption(rng) for _ in range(12)]
    images[5], texts[8] = None, None
    labels = [i % 2 for i in range(12)]
    write_hugging_face_parquet(tmp_path / "hf" / "train-00000-of-00001.parquet", images, texts, labels)
    source = open_source([tmp_path / "hf"], "parquet", columns={"label": "label"})
    assert isinstance(source, ParquetSource) and source.size_hint() == 12 and source.has_labels("train")
    tokenizer = train_wordpiece(texts[:5] * 3, vocab_size=40, min_frequency=1)
    options = PreprocessOptions(image_size=SIZE, max_len=8, workers=0, pixel_dtype="uint8")
    report = preprocess(source, tmp_path / "out", tokenizer, options)
    assert report.skipped == {"missing-image": 1, "no-caption": 1}
    rows = cache_rows(tmp_path / "out", report.splits)
    stem = "train-00000-of-00001"
    assert sorted(rows) == sorted(f"{stem}/{i}" for i in range(12) if i not in (5, 8))  # no key column: FILE/ROW
    for i, (image, text, label) in enumerate(zip(images, texts, labels, strict=True)):
        if i in (5, 8):
            continue
        got_text, got_image, got_label = rows[f"{stem}/{i}"]
        assert (got_text, got_label) == (text, label)
        np.testing.assert_array_equal(got_image, decode_resize(image, size=SIZE).transpose(2, 0, 1))


def test_a_missing_column_is_one_clear_error_listing_the_columns(tmp_path, run_cli):
    rng = np.random.default_rng(6)
    path = write_img2dataset_parquet(tmp_path / "i2d", 0, [Row(key_of(0, 0), "a red circle", photo(rng, 40, 40))])
    result = run_cli(
        "preprocess", "--format", "parquet", str(path), "--caption-col", "alt_text",
        "--to-mmap", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "missing.json"),
    )  # fmt: skip
    assert result.returncode == 2
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert "has no caption column (alt_text); pass --caption-col NAME. Its columns: url (string), caption (string)" in (
        " ".join(lines)
    )
    assert "jpg (binary)" in " ".join(lines) and "Traceback" not in err
    with pytest.raises(UsageError, match="has no label column"):
        open_source([path], "parquet", columns={"label": "label"})
    with pytest.raises(UsageError, match="only apply to --format webdataset or parquet"):
        open_source([tmp_path], "fetch", columns={"image": "jpg"})


def test_an_unreadable_file_is_a_counted_skip_and_the_rest_is_read(tmp_path):
    rng = np.random.default_rng(8)
    write_img2dataset_parquet(
        tmp_path / "i2d", 0, [Row(key_of(0, i), caption(rng), photo(rng, 40, 40)) for i in range(5)]
    )
    (tmp_path / "i2d" / "00001.parquet").write_bytes(b"PAR1 truncated by a failed copy")
    items = list(open_source([tmp_path / "i2d"], "parquet"))
    assert [i.key for i in items[:5]] == [key_of(0, i) for i in range(5)]
    assert items[5].reason == "unreadable-shard" and items[5].where.endswith("00001.parquet:(footer)")
