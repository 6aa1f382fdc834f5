"""Write the layouts researchers' copies come in, exactly as their writers do, offline.

- img2dataset 1.47's `webdataset` output (`writer.py`, `WebDatasetSampleWriter`): per shard
  `NNNNN.tar` written by `webdataset.TarWriter` (members `KEY.jpg`, `KEY.txt`, `KEY.json`, the json
  being the sample's metadata with `indent=4`; failed samples are left out of the tar), beside
  `NNNNN.parquet` (the metadata of every sample, failed ones too) and `NNNNN_stats.json`.
- img2dataset's `parquet` output (`ParquetSampleWriter`): the input columns (`url`, `caption`),
  then `key`, `status`, `error_message`, `width`, `height`, `original_width`, `original_height`,
  then the image as `jpg` binary (null where `status` is not `success`).
- Hugging Face `datasets`: an `Image()` feature (`struct<bytes, path>`) and a text column, written
  by `datasets` itself.

Keys are img2dataset's: shard id then sample index, zero-padded (`compute_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vilbert.pipeline.images import encode_jpeg

SAMPLE_DIGITS, SHARD_DIGITS = 4, 5


@dataclass
class Row:
    """One sample as img2dataset saw it."""

    key: str
    caption: str | None
    image: bytes | None
    status: str = "success"
    error: str | None = None
    extra_json: dict | None = None
    """Replaces the json member's fields (e.g. a label, or no caption)."""
    drop: tuple[str, ...] = ()
    """Members left out of the tar sample (e.g. `txt`, `jpg`)."""


def key_of(shard: int, index: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}{index:0{SAMPLE_DIGITS}d}"


def photo(rng: np.random.Generator, width: int, height: int, fmt: str = "jpeg") -> bytes:
    """A small image with structure (not flat): blocks of colour plus noise."""
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((height // 4 + 1, width // 4 + 1, 1), np.uint8))[:height, :width]
    noisy = np.clip(big.astype(np.int16) + rng.integers(-12, 12, big.shape), 0, 255).astype(np.uint8)
    if fmt == "jpeg":
        return encode_jpeg(np.ascontiguousarray(noisy), quality=90)
    import io

    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def meta(row: Row) -> dict:
    width = height = None if row.status != "success" else 48
    return {
        "url": f"http://127.0.0.1/{row.key}.jpg",
        "caption": row.caption,
        "key": row.key,
        "status": row.status,
        "error_message": row.error,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
    }


def write_webdataset_shard(directory: Path, shard: int, rows: list[Row]) -> Path:
    """`NNNNN.tar` + `NNNNN.parquet` + `NNNNN_stats.json`, as img2dataset writes them."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    name = f"{shard:0{SHARD_DIGITS}d}"
    path = directory / f"{name}.tar"
    with open(path, "wb") as handle:
        writer = wds.TarWriter(handle)
        for row in rows:
            if row.status != "success":
                continue  # img2dataset writes only the metadata of a failed sample
            fields = meta(row) if row.extra_json is None else {**meta(row), **row.extra_json}
            sample = {
                "__key__": row.key,
                "jpg": row.image,
                "txt": row.caption or "",
                "json": json.dumps(fields, indent=4),
            }
            for member in row.drop:
                sample.pop(member)
            writer.write(sample)
        writer.close()
    table = pa.Table.from_pylist([meta(r) for r in rows], schema=_META_SCHEMA)
    pq.write_table(table, directory / f"{name}.parquet")
    successes = sum(r.status == "success" for r in rows)
    stats = {"count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes}
    (directory / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return path


def write_img2dataset_parquet(directory: Path, shard: int, rows: list[Row]) -> Path:
    """`NNNNN.parquet` of img2dataset's parquet output: metadata columns, then `jpg`."""
    directory.mkdir(parents=True, exist_ok=True)
    schema = _META_SCHEMA.append(pa.field("jpg", pa.binary()))
    records = [{**meta(r), "jpg": r.image if r.status == "success" else None} for r in rows]
    path = directory / f"{shard:0{SHARD_DIGITS}d}.parquet"
    writer = pq.ParquetWriter(path, schema)
    for start in range(0, len(records), 100):  # img2dataset's BufferedParquetWriter: 100 rows a write
        writer.write_table(pa.Table.from_pylist(records[start : start + 100], schema=schema))
    writer.close()
    return path


def write_hugging_face_parquet(path: Path, images: list[bytes | None], texts: list[str | None], labels=None) -> Path:
    """A Hugging Face image dataset saved by `datasets` (`Image()` feature = struct<bytes, path>)."""
    import datasets

    features = {"image": datasets.Image(), "text": datasets.Value("string")}
    data: dict = {"image": [None if b is None else {"bytes": b, "path": None} for b in images], "text": texts}
    if labels is not None:
        features["label"] = datasets.Value("int64")
        data["label"] = labels
    dataset = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


_META_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
    ]
)
