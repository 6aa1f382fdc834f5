"""Parquet files as a preprocess source: img2dataset's `parquet` output and Hugging Face image datasets.

Two layouts, told apart by the image column's type:

- img2dataset: `jpg` (or `png`, `webp`: its `--encode_format`) binary, `caption`, `key`, and a
  `status` that is `success` for the rows that hold an image (`failed_to_download`,
  `failed_to_resize` rows have a null image and are skipped as `failed-status`).
- Hugging Face `datasets` (an `Image` feature): `image` as `struct<bytes: binary, path: string>`
  beside a text column (`caption`, `text`, ...).

Each file is read in record batches of at most `batch_rows` rows, row group by row group, with only
the columns used (pyarrow decodes the columns on its own threads; the images are decoded on all
cores by preprocess's pool), so memory holds one row group, whatever the file size. Every file's
schema is checked when the source is made: a missing column is a `UsageError` naming the file and
listing its columns. Rows without an image (`missing-image`) or with one over `MAX_MEMBER_BYTES`
(`too-large`), without a caption (`no-caption`), without a key (`malformed-key`), with a label
that is not an integer (`malformed-label`) are counted skips naming file and row; a file that cannot be read is one
`unreadable-shard` skip (the rows before the break are kept).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vilbert.errors import UsageError
from vilbert.pipeline.shard_inputs import Columns, describe_shards, expand_shards, key_prefixes
from vilbert.pipeline.sources import Sample, Skip, Source, integer_label
from vilbert.pipeline.webdataset import MAX_MEMBER_BYTES

__all__ = ["PARQUET_SUFFIXES", "PARQUET_COLUMNS", "ParquetSource"]

PARQUET_SUFFIXES = (".parquet",)
PARQUET_COLUMNS = Columns(
    image=("jpg", "png", "webp", "jpeg", "image", "img"),
    caption=("caption", "txt", "text"),
    key=("key", "id"),
)
"""img2dataset's columns first, then the names Hugging Face image datasets use."""
STATUS_COLUMN = "status"
_ROLES = ("image", "caption", "label", "key")


@dataclass(frozen=True)
class _Layout:
    """The columns one file uses for each role (None: the role has no column in this file)."""

    image: str
    image_is_struct: bool
    caption: str
    label: str | None
    key: str | None
    status: str | None
    error: str | None

    def names(self) -> list[str]:
        return [c for c in (self.image, self.caption, self.label, self.key, self.status, self.error) if c]


class ParquetSource(Source):
    """Rows of parquet files, file after file, each in row order.

    Args:
        paths: Parquet files, directories of them, or glob patterns.
        columns: Which columns hold the image, caption, label and key; an explicitly chosen
            label or key column must exist, the default key (`key`, `id`) may be absent: the key is
            then `<file name>/<row>`.
        key_prefix: `none` or `source` (see `shard_inputs.KEY_PREFIXES`).
        batch_rows: Rows per record batch read.

    Raises:
        UsageError: no file found, or a file lacking a column (the message lists its columns).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        columns: Columns = PARQUET_COLUMNS,
        key_prefix: str = "none",
        batch_rows: int = 256,
    ) -> None:
        self.files = expand_shards(paths, PARQUET_SUFFIXES, "parquet files")
        self.columns = columns
        self.prefixes = key_prefixes(self.files, key_prefix, PARQUET_SUFFIXES)
        self.batch_rows = batch_rows
        self.layouts: dict[Path, _Layout | str] = {f: _layout(f, columns) for f in self.files}
        """Each file's columns, or why it cannot be read (a counted skip when iterated)."""
        self.description = describe_shards("parquet", self.files, columns, key_prefix)

    def has_labels(self, split: str) -> bool:
        return bool(self.columns.label)

    def size_hint(self) -> int | None:
        total = 0
        for file in self.files:
            try:
                total += pq.ParquetFile(file).metadata.num_rows
            except (OSError, pa.ArrowException):
                return None
        return total

    def __iter__(self) -> Iterator[Sample | Skip]:
        for file in self.files:
            layout = self.layouts[file]
            if isinstance(layout, str):
                yield Skip(f"{file}:", "unreadable-shard", layout, source=str(file), member="(footer)")
                continue
            yield from self._file_items(file, layout)

    def captions(self) -> Iterator[str]:
        """Every caption of the rows that hold an image, reading no image (for `vilbert tokenizer train`)."""
        for file in self.files:
            layout = self.layouts[file]
            if isinstance(layout, str):
                continue
            names = [layout.caption] + ([layout.status] if layout.status else [])
            for batch in pq.ParquetFile(file).iter_batches(batch_size=4096, columns=names):
                captions = batch.column(layout.caption).to_pylist()
                ok = batch.column(layout.status).to_pylist() if layout.status else [None] * len(captions)
                yield from (
                    c for c, s in zip(captions, ok, strict=True) if isinstance(c, str) and s in (None, "success")
                )

    def _file_items(self, file: Path, layout: _Layout) -> Iterator[Sample | Skip]:
        row = 0
        try:
            reader = pq.ParquetFile(file)
            for batch in reader.iter_batches(batch_size=self.batch_rows, columns=layout.names(), use_threads=True):
                yield from self._batch_items(file, layout, batch, row)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as err:
            detail = f"reading stops at row {row} ({type(err).__name__}: {err}); earlier rows are kept"
            yield Skip(f"{file}:{row}", "unreadable-shard", detail, source=str(file), member=f"row {row}")

    def _batch_items(
        self, file: Path, layout: _Layout, batch: pa.RecordBatch, first_row: int
    ) -> Iterator[Sample | Skip]:
        images = batch.column(layout.image)
        image_bytes = (images.field("bytes") if layout.image_is_struct else images).to_pylist()
        image_paths = images.field("path").to_pylist() if layout.image_is_struct else None
        captions = batch.column(layout.caption).to_pylist()
        values = {role: _values(batch, getattr(layout, role)) for role in ("label", "key", "status", "error")}
        prefix, source = self.prefixes[file], str(file)
        for i, (image, caption) in enumerate(zip(image_bytes, captions, strict=True)):
            row = first_row + i
            own_key = values["key"][i] if layout.key else f"{_stem(file)}/{row}"
            key = prefix + str(own_key)
            where = {"source": source, "member": f"row {row}"}
            status = values["status"][i] if layout.status else "success"
            if own_key is None or own_key == "":
                yield Skip(key, "malformed-key", f"column {layout.key} is empty", **where)
            elif status != "success":
                error = values["error"][i] if layout.error else None
                yield Skip(key, "failed-status", f"status={status}" + (f": {error}" if error else ""), **where)
            elif not image:
                stored = f" (only a path: {image_paths[i]!r})" if image_paths and image_paths[i] else ""
                yield Skip(key, "missing-image", f"column {layout.image} holds no bytes{stored}", **where)
            elif len(image) > MAX_MEMBER_BYTES:
                yield Skip(key, "too-large", f"{len(image):,} image bytes (over {MAX_MEMBER_BYTES:,})", **where)
            elif not isinstance(caption, str):
                yield Skip(key, "no-caption", f"column {layout.caption} is null", **where)
            else:
                label = values["label"][i] if layout.label else None
                if layout.label:
                    try:
                        label = integer_label(label)
                    except ValueError:
                        yield Skip(key, "malformed-label", f"{layout.label}={label!r} is not an integer", **where)
                        continue
                yield Sample(key=key, image=image, caption=caption, label=label, **where)


def _values(batch: pa.RecordBatch, column: str | None) -> list[Any]:
    return batch.column(column).to_pylist() if column else []


def _stem(file: Path) -> str:
    return file.name[: -len(".parquet")] if file.name.endswith(".parquet") else file.stem


# ------------------------------------------------------------------------------------------ schema


def _layout(file: Path, columns: Columns) -> _Layout | str:
    """The columns `file` uses for each role; a string saying why when the file cannot be read.

    Raises:
        UsageError: a role without a column in the file, or a column of an unusable type.
    """
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as err:
        return f"not a readable parquet file ({type(err).__name__}: {err})"
    chosen = {role: next((c for c in getattr(columns, role) if c in schema.names), None) for role in _ROLES}
    required = ["image", "caption"] + (["label"] if columns.label else [])
    required += ["key"] if columns.key and columns.key != PARQUET_COLUMNS.key else []  # chosen, so required
    for role in required:
        if chosen[role] is None:
            _missing(file, schema, role, getattr(columns, role))
    image_type = schema.field(chosen["image"]).type
    is_struct = pa.types.is_struct(image_type)
    if is_struct and image_type.get_field_index("bytes") < 0:
        raise UsageError(f"{file}: image column {chosen['image']!r} is {image_type}, a struct without `bytes`")
    if not is_struct and not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise UsageError(f"{file}: image column {chosen['image']!r} is {image_type}; expected binary or struct<bytes>")
    caption_type = schema.field(chosen["caption"]).type
    if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type)):
        raise UsageError(f"{file}: caption column {chosen['caption']!r} is {caption_type}; expected text")
    status = STATUS_COLUMN if STATUS_COLUMN in schema.names else None
    error = "error_message" if status and "error_message" in schema.names else None
    return _Layout(chosen["image"], is_struct, chosen["caption"], chosen["label"], chosen["key"], status, error)


def _missing(file: Path, schema: pa.Schema, role: str, choices: Sequence[str]) -> None:
    listed = ", ".join(f"{f.name} ({f.type})" for f in schema)
    raise UsageError(
        f"{file} has no {role} column ({' or '.join(choices)}); pass --{role}-col NAME. Its columns: {listed}"
    )
