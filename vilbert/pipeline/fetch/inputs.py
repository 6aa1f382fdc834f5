"""Streamed URL lists: Conceptual Captions TSV, and TSV/CSV/JSONL/Parquet tables with named columns.

Every reader yields `UrlRow`s for usable lines and `BadLine`s for lines it could not parse, in file
order, one at a time: a 100M-line list never sits in memory. Line numbers are 1-based physical
line numbers of the file (the header of a TSV/CSV is line 1; for Parquet, the row number + 1), so
a report can point at the line. Captions are kept byte-exact: no quote stripping, no whitespace
trimming (only the line terminator goes), so `"a "quoted" caption"` stays as written.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vilbert.errors import FetchError, UsageError

__all__ = ["INPUT_FORMATS", "UrlRow", "BadLine", "read_cc_tsv", "read_url_table", "detect_format"]

INPUT_FORMATS = ("tsv", "csv", "jsonl", "parquet")


@dataclass(frozen=True, slots=True)
class UrlRow:
    """One usable line of the list."""

    line: int
    url: str
    caption: str


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that could not be parsed; it is reported (reason `malformed-line`), never fetched."""

    line: int
    message: str
    text: str = ""
    """The start of the raw line, for the failures table."""


def read_cc_tsv(path: str | Path) -> Iterator[UrlRow | BadLine]:
    """Conceptual Captions' format: `caption<TAB>url` per line, no header, UTF-8."""
    with _open_binary(path) as stream:
        for line_no, raw in enumerate(stream, start=1):
            yield _parse_tab_line(raw, line_no, url_index=1, caption_index=0, n_fields=2)


def read_url_table(
    path: str | Path, *, fmt: str = "auto", url_col: str = "url", caption_col: str | None = "caption"
) -> Iterator[UrlRow | BadLine]:
    """A table of URLs with a header (TSV, CSV) or named fields (JSONL, Parquet).

    Args:
        path: The list; `.gz` is decompressed on the fly for the text formats.
        fmt: One of `INPUT_FORMATS`, or `auto` to go by the file extension.
        url_col: Column holding the URL.
        caption_col: Column holding the caption, or None for lists without captions ("").
    """
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in INPUT_FORMATS:
        raise UsageError(f"--format {fmt!r} is not supported; valid: auto, {', '.join(INPUT_FORMATS)}")
    readers = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
    return readers[fmt](Path(path), url_col, caption_col)


def detect_format(path: str | Path) -> str:
    """The format named by the extension (`.tsv`, `.csv`, `.jsonl`/`.json`, `.parquet`, each `.gz`)."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    ext = {"json": "jsonl", "ndjson": "jsonl", "txt": "tsv", "pq": "parquet"}.get(ext, ext)
    if ext not in INPUT_FORMATS:
        raise UsageError(
            f"cannot tell the format of {path} from its extension; pass --format, one of: {', '.join(INPUT_FORMATS)}"
        )
    return ext


def _open_binary(path: str | Path) -> BinaryIO:
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"URL list {path} does not exist or is not a file")
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    return raw


def _parse_tab_line(raw: bytes, line_no: int, *, url_index: int, caption_index: int | None, n_fields: int):
    raw = _strip_eol(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadLine(line_no, f"not UTF-8 ({err.reason} at byte {err.start})", raw[:200].decode("utf-8", "replace"))
    fields = text.split("\t")
    if len(fields) != n_fields:
        return BadLine(line_no, f"expected {n_fields} tab-separated fields, found {len(fields)}", text[:200])
    url = fields[url_index]
    if not url.strip():
        return BadLine(line_no, "empty URL", text[:200])
    caption = fields[caption_index] if caption_index is not None else ""
    return UrlRow(line_no, url.strip(), caption)


def _header_indices(header: list[str], url_col: str, caption_col: str | None, path: Path) -> tuple[int, int | None]:
    def index(col: str) -> int:
        if col not in header:
            raise FetchError(f"{path}: no column {col!r} in the header; columns: {', '.join(header)}")
        return header.index(col)

    return index(url_col), (index(caption_col) if caption_col is not None else None)


def _read_tsv(path: Path, url_col: str, caption_col: str | None) -> Iterator[UrlRow | BadLine]:
    # No quoting rules at all: a TSV field is everything between tabs, quotes included.
    with _open_binary(path) as stream:
        header = _strip_eol(stream.readline()).decode("utf-8", "replace").split("\t")
        url_i, cap_i = _header_indices(header, url_col, caption_col, path)
        for line_no, raw in enumerate(stream, start=2):
            yield _parse_tab_line(raw, line_no, url_index=url_i, caption_index=cap_i, n_fields=len(header))


def _read_csv(path: Path, url_col: str, caption_col: str | None) -> Iterator[UrlRow | BadLine]:
    # RFC 4180 quoting (a quoted field may span lines); a row's line is the line it starts on.
    with _open_binary(path) as binary:
        text = io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return
        url_i, cap_i = _header_indices(header, url_col, caption_col, path)
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield BadLine(start, f"CSV syntax: {err}")
                start = reader.line_num + 1
                continue
            yield _row_from_fields(fields, start, url_i, cap_i, len(header))
            start = reader.line_num + 1


def _row_from_fields(fields: list[str], line_no: int, url_i: int, cap_i: int | None, n: int) -> UrlRow | BadLine:
    joined = ",".join(fields)[:200]
    if len(fields) != n:
        return BadLine(line_no, f"expected {n} fields, found {len(fields)}", joined.encode("utf-8", "replace").decode())
    if any("\udc80" <= ch <= "\udcff" for field in fields for ch in field):
        return BadLine(line_no, "not UTF-8", joined.encode("utf-8", "replace").decode())
    url = fields[url_i].strip()
    if not url:
        return BadLine(line_no, "empty URL", joined)
    return UrlRow(line_no, url, fields[cap_i] if cap_i is not None else "")


def _read_jsonl(path: Path, url_col: str, caption_col: str | None) -> Iterator[UrlRow | BadLine]:
    with _open_binary(path) as stream:
        for line_no, raw in enumerate(stream, start=1):
            raw = _strip_eol(raw)
            if not raw.strip():
                continue
            yield _row_from_json(raw, line_no, url_col, caption_col)


def _row_from_json(raw: bytes, line_no: int, url_col: str, caption_col: str | None) -> UrlRow | BadLine:
    text = raw[:200].decode("utf-8", "replace")
    try:
        record = json.loads(raw)
    except ValueError as err:
        return BadLine(line_no, f"invalid JSON: {err}", text)
    if not isinstance(record, dict):
        return BadLine(line_no, "not a JSON object", text)
    url, caption = record.get(url_col), record.get(caption_col, "") if caption_col else ""
    if not isinstance(url, str) or not url.strip():
        return BadLine(line_no, f"field {url_col!r} missing or not a non-empty string", text)
    if not isinstance(caption, str):
        return BadLine(line_no, f"field {caption_col!r} is not a string", text)
    return UrlRow(line_no, url.strip(), caption)


def _read_parquet(path: Path, url_col: str, caption_col: str | None) -> Iterator[UrlRow | BadLine]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FetchError(f"URL list {path} does not exist or is not a file")
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    columns = [url_col] + ([caption_col] if caption_col else [])
    for col in columns:
        if col not in names:
            raise FetchError(f"{path}: no column {col!r}; columns: {', '.join(names)}")
    row = 0
    for batch in parquet.iter_batches(batch_size=65_536, columns=columns):
        urls = batch.column(url_col).to_pylist()
        captions = batch.column(caption_col).to_pylist() if caption_col else [""] * len(urls)
        for url, caption in zip(urls, captions, strict=True):
            row += 1
            if not isinstance(url, str) or not url.strip():
                yield BadLine(row, f"column {url_col!r} is empty")
            else:
                yield UrlRow(row, url.strip(), caption if isinstance(caption, str) else "")
