"""URL-list readers: line numbers, byte-exact captions, malformed lines reported, all formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vilbert.errors import FetchError, UsageError
from vilbert.pipeline.fetch.inputs import BadLine, UrlRow, detect_format, read_cc_tsv, read_url_table

TRICKY = [
    'a "quoted" caption',
    '"starts and ends with quotes"',
    "  leading and trailing spaces  ",
    "l'apostrophe, commas; and \\backslash",
    "ünïcödé ✓ 漢字",
    "",
]


def test_cc_tsv_keeps_captions_byte_exact_and_reports_malformed_lines(tmp_path: Path) -> None:
    lines = [f"{c}\thttp://h/{i}.jpg" for i, c in enumerate(TRICKY)]
    lines.insert(2, "no tab here")  # line 3
    lines.insert(4, "too\tmany\ttabs")  # line 5
    lines.insert(6, "caption\t   ")  # line 7: empty URL
    raw = ("\n".join(lines) + "\r\n").encode() + b"bad \xff utf8\thttp://h/x.jpg\n" + b"last\thttp://h/last.jpg"
    path = tmp_path / "cc.tsv"
    path.write_bytes(raw)
    rows = list(read_cc_tsv(path))
    good = [r for r in rows if isinstance(r, UrlRow)]
    bad = [r for r in rows if isinstance(r, BadLine)]
    assert [r.caption for r in good] == [*TRICKY, "last"]
    assert good[-2].url == "http://h/5.jpg", "the CRLF of the last TRICKY line is not part of the URL"
    assert [b.line for b in bad] == [3, 5, 7, 10]
    assert "expected 2" in bad[0].message and "found 3" in bad[1].message
    assert "empty URL" in bad[2].message and "UTF-8" in bad[3].message
    assert [r.line for r in rows] == list(range(1, 12))


def test_cc_tsv_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "big.tsv"
    with path.open("w") as f:
        for i in range(50_000):
            f.write(f"caption {i}\thttp://h/{i}.jpg\n")
    rows = read_cc_tsv(path)
    assert next(rows) == UrlRow(1, "http://h/0.jpg", "caption 0")  # a generator: nothing read ahead


def test_tsv_with_header_has_no_quoting_rules(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv.gz"
    body = "id\turl\tcaption\n" + "".join(f"{i}\thttp://h/{i}.jpg\t{c}\n" for i, c in enumerate(TRICKY))
    path.write_bytes(gzip.compress(body.encode()))
    rows = list(read_url_table(path))
    assert [r.caption for r in rows] == TRICKY
    assert [r.line for r in rows] == list(range(2, 2 + len(TRICKY)))


def test_csv_quotes_and_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text(
        'url,caption\nhttp://h/1.jpg,"say ""hi"", twice"\nhttp://h/2.jpg,"two\nlines"\n'
        "http://h/3.jpg,plain\nonly-one-field\nhttp://h/5.jpg,ok\n",
        newline="",
    )
    rows = list(read_url_table(path, url_col="url", caption_col="caption"))
    assert [(r.line, getattr(r, "caption", None)) for r in rows] == [
        (2, 'say "hi", twice'),
        (3, "two\nlines"),
        (5, "plain"),
        (6, None),
        (7, "ok"),
    ]
    assert isinstance(rows[3], BadLine) and "expected 2 fields" in rows[3].message


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    records = [{"u": f"http://h/{i}.jpg", "c": c} for i, c in enumerate(TRICKY)]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n" + json.dumps({"c": "x"}) + "\n")
    rows = list(read_url_table(jsonl, url_col="u", caption_col="c"))
    assert [r.caption for r in rows[: len(TRICKY)]] == TRICKY
    assert [type(r) for r in rows[-2:]] == [BadLine, BadLine]
    assert rows[-1].line == len(TRICKY) + 2 and "'u' missing" in rows[-1].message

    parquet = tmp_path / "list.parquet"
    pq.write_table(pa.Table.from_pylist(records + [{"u": None, "c": "x"}]), parquet, row_group_size=2)
    rows = list(read_url_table(parquet, url_col="u", caption_col="c"))
    assert [r.caption for r in rows[:-1]] == TRICKY and isinstance(rows[-1], BadLine)
    assert [r.line for r in rows] == list(range(1, len(TRICKY) + 2))


def test_missing_column_and_unknown_format_name_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv"
    path.write_text("link\ttext\nhttp://h/1.jpg\thi\n")
    with pytest.raises(FetchError, match="no column 'url'.*columns: link, text"):
        list(read_url_table(path))
    with pytest.raises(UsageError, match="tsv, csv, jsonl, parquet"):
        detect_format(tmp_path / "list.xlsx")
    with pytest.raises(FetchError, match="does not exist"):
        list(read_cc_tsv(tmp_path / "nope.tsv"))
