"""Where preprocess reads samples from: fetch output, Hateful Memes, a folder with a listing, and
(in their own modules, opened through `open_source`) webdataset tar shards and parquet files.

A source is an iterable of `Sample` (a key, the encoded image as bytes or a path, the caption, an
optional label and split) and `Skip` (a line or sample that cannot be used, with a short reason),
in a deterministic order. Sources with their own splits (Hateful Memes' jsonl files, a JSONL listing
with a `split` field) say so through `split_names()`; the others are split by key hash
(`assign_splits`, `split_for_key`) so that a key always lands in the same split.

- `FetchSource(dirs)`: the saved rows of one or more `vilbert fetch` output directories, merged in
  source line order (the rows and order of `vilbert.pipeline.fetch.iter_fetched`, read with bounded
  memory); JPEGs already at the fetch size, no labels.
- `HatefulMemesSource(dir)`: `train.jsonl`, `dev_seen.jsonl`, `test_seen.jsonl` (and
  `dev_unseen.jsonl`, `test_unseen.jsonl`, phase-1 `dev.jsonl`/`test.jsonl` when present), lines
  `{"id", "img", "label", "text"}`, images under the directory; each file is a split.
- `FolderSource(dir, listing)`: a TSV (`image<TAB>caption[<TAB>label]`, optional header) or JSONL
  (`{"image"|"img"|"path", "caption"|"text", "label"?, "key"|"id"?, "split"?}`) listing image
  paths relative to `dir`.
- `WebDatasetSource` (`vilbert.pipeline.webdataset`), `ParquetSource` (`vilbert.pipeline.parquet`):
  the copies researchers already hold (img2dataset output, Hugging Face image datasets); their
  samples name the shard file and member they came from (`Sample.source`, `Sample.member`).

Malformed lines are skipped, reported as `Skip(key="FILE:LINE", reason="malformed-line")`. An image
path of a listing becomes a `LocalFile`: read by the decode worker only if it resolves inside the
dataset directory, is a regular file and is at most `max_file_bytes` (`vilbert.pipeline.local_files`);
otherwise the sample is skipped as `outside-root`, `not-a-file`, `too-large` (or `missing-image`,
`unreadable-image`), with the listing's FILE:LINE in the detail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vilbert.errors import DataError, UsageError
from vilbert.pipeline.local_files import DEFAULT_MAX_FILE_BYTES, LocalFile

__all__ = [
    "SOURCE_FORMATS",
    "HATEFUL_MEMES_SPLITS",
    "Sample",
    "Skip",
    "Source",
    "FetchSource",
    "HatefulMemesSource",
    "FolderSource",
    "open_source",
    "split_for_key",
    "assign_splits",
    "iter_captions",
    "integer_label",
]

SOURCE_FORMATS = ("fetch", "hateful-memes", "folder", "webdataset", "parquet")
HATEFUL_MEMES_SPLITS = ("train", "dev_seen", "test_seen", "dev_unseen", "test_unseen", "dev", "test")
"""The jsonl files read, in this order, when present (phase 1 had dev/test, phase 2 *_seen/*_unseen)."""
UNSPLIT = ("train", "test")
_IMAGE_FIELDS = ("image", "img", "path", "file")
_CAPTION_FIELDS = ("caption", "text")
_KEY_FIELDS = ("key", "id")


@dataclass(frozen=True, slots=True)
class Sample:
    """One image-caption pair."""

    key: str
    """Stable id, unique within its split."""
    image: bytes | LocalFile
    """The encoded image, or the dataset file holding it (read, with its checks, when decoded)."""
    caption: str
    label: int | None = None
    split: str | None = None
    """None until the source's own split or `assign_splits` sets it."""
    source: str | None = None
    """The shard file it came from, for sources read from several (rows and skips are counted per source)."""
    member: str | None = None
    """Where in `source`: a tar member's name, a parquet row."""

    @property
    def where(self) -> str:
        """`SOURCE:MEMBER` when known, else the key: what a skip of this sample names."""
        return f"{self.source}:{self.member}" if self.source else self.key


@dataclass(frozen=True, slots=True)
class Skip:
    """An input that does not become a row, and why."""

    key: str
    """The sample key, or `FILE:LINE` for a line that could not be parsed."""
    reason: str
    """Short label used to count skips: `malformed-line`, `empty-caption`, `undecodable`, ..."""
    detail: str = ""
    split: str | None = None
    source: str | None = None
    """As `Sample.source`."""
    member: str | None = None
    """As `Sample.member`."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.member}" if self.source else self.key


class Source(ABC):
    """A deterministic stream of samples and skips."""

    description: str = ""
    """One line naming what is read (for logs and the report)."""

    @abstractmethod
    def __iter__(self) -> Iterator[Sample | Skip]:
        """Samples (and skips) in a fixed order: the same input gives the same sequence."""

    def split_names(self) -> tuple[str, ...] | None:
        """The splits the source defines itself, or None: split by key hash into train/test."""
        return None

    def has_labels(self, split: str) -> bool:
        """Whether the samples of `split` carry labels."""
        return False

    def size_hint(self) -> int | None:
        """Number of items the iteration yields, when cheap to know (for progress bars)."""
        return None


# ------------------------------------------------------------------------------------------ splits


def split_for_key(key: str, train_ratio: float) -> str:
    """`train` or `test` from a hash of the key: stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "train" if int.from_bytes(digest, "big") < train_ratio * 2.0**64 else "test"


def assign_splits(items: Iterable[Sample | Skip], train_ratio: float) -> Iterator[Sample | Skip]:
    """Set the split of samples (and keyed skips) that have none, by key hash."""
    if not 0.0 < train_ratio < 1.0:
        raise UsageError(f"train_ratio={train_ratio} is invalid; valid: 0 < ratio < 1")
    for item in items:
        if item.split is None and (isinstance(item, Sample) or item.reason != "malformed-line"):
            item = dataclasses.replace(item, split=split_for_key(item.key, train_ratio))
        yield item


# ------------------------------------------------------------------------------------ fetch output


class FetchSource(Source):
    """The saved rows of `vilbert fetch` output directories, in source line order."""

    def __init__(self, dirs: Sequence[str | os.PathLike[str]]) -> None:
        self.dirs = _distinct_dirs(dirs)
        for directory in self.dirs:
            if _looks_like_hateful_memes(directory):
                raise UsageError(
                    f"{directory} looks like Hateful Memes (train.jsonl + img/); pass --format hateful-memes"
                )
        self.description = "fetch output " + ", ".join(str(d.resolve()) for d in self.dirs)

    def __iter__(self) -> Iterator[Sample | Skip]:
        # iter_fetched's rows and order (several outputs, e.g. the --num-shards parts of one list,
        # merge in line order) with bounded resident memory; imported here: fetch imports aiohttp.
        from vilbert.pipeline._fetched_rows import iter_fetched_rows

        for batch in iter_fetched_rows(self.dirs, batch_size=256):
            keys = batch.column("key").to_pylist()
            captions = batch.column("caption").to_pylist()
            images = batch.column("jpeg").to_pylist()
            for key, caption, image in zip(keys, captions, images, strict=True):
                yield Sample(key=key, image=image, caption=caption or "")

    def size_hint(self) -> int:
        from vilbert.pipeline.fetch import count_fetched

        return sum(count_fetched(d) for d in self.dirs)


def _distinct_dirs(dirs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if not dirs:
        raise UsageError("no source given; pass one or more directories")
    out: list[Path] = []
    for entry in dirs:
        path = Path(entry)
        if not path.is_dir():
            raise UsageError(f"source directory {path} does not exist")
        if any(path.resolve() == seen.resolve() for seen in out):
            raise UsageError(f"source directory {path} is given twice")
        out.append(path)
    return out


def _looks_like_hateful_memes(directory: Path) -> bool:
    return (directory / "train.jsonl").is_file() and (directory / "img").is_dir()


# ---------------------------------------------------------------------------------- hateful memes


class HatefulMemesSource(Source):
    """The Hateful Memes layout: one split per jsonl file, images under the directory."""

    def __init__(self, directory: str | os.PathLike[str], *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.root = Path(directory)
        self.max_file_bytes = max_file_bytes
        if not self.root.is_dir():
            raise UsageError(f"Hateful Memes directory {self.root} does not exist")
        self.files = {s: self.root / f"{s}.jsonl" for s in HATEFUL_MEMES_SPLITS if (self.root / f"{s}.jsonl").is_file()}
        if not self.files:
            raise UsageError(
                f"{self.root} holds none of {', '.join(s + '.jsonl' for s in HATEFUL_MEMES_SPLITS)}; "
                "is it a Hateful Memes directory?"
            )
        self._labelled = {split: _any_labelled(file) for split, file in self.files.items()}
        self.description = f"Hateful Memes {self.root.resolve()} ({', '.join(self.files)})"

    def split_names(self) -> tuple[str, ...]:
        return tuple(self.files)

    def has_labels(self, split: str) -> bool:
        return self._labelled[split]

    def size_hint(self) -> int:
        return sum(_count_lines(f) for f in self.files.values())

    def __iter__(self) -> Iterator[Sample | Skip]:
        for split, file in self.files.items():
            for where, record in _jsonl_records(file):
                if isinstance(record, Skip):
                    yield dataclasses.replace(record, split=split)
                    continue
                yield _record_sample(
                    record,
                    where,
                    self.root.resolve(),
                    split,
                    self._labelled[split],
                    image_fields=("img",),
                    caption_fields=("text",),
                    key_fields=("id",),
                    max_file_bytes=self.max_file_bytes,
                )


# ----------------------------------------------------------------------------------------- folder


class FolderSource(Source):
    """Images under a directory, listed with captions (and labels) in a TSV or JSONL file."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        listing: str | os.PathLike[str],
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.root, self.listing = Path(directory), Path(listing)
        self.max_file_bytes = max_file_bytes
        if not self.root.is_dir():
            raise UsageError(f"image folder {self.root} does not exist")
        if not self.listing.is_file():
            raise UsageError(f"listing {self.listing} does not exist; pass a TSV or JSONL with --listing")
        self.jsonl = _is_jsonl(self.listing)
        self._labelled, self._splits = self._scan()
        self.description = f"folder {self.root.resolve()} listed in {self.listing.resolve()}"

    def split_names(self) -> tuple[str, ...] | None:
        return self._splits

    def has_labels(self, split: str) -> bool:
        return self._labelled

    def size_hint(self) -> int:
        return _count_lines(self.listing)

    def __iter__(self) -> Iterator[Sample | Skip]:
        root = self.root.resolve()
        for where, record in self._records():
            if isinstance(record, Skip):
                yield record
                continue
            split = record.get("split")
            if self._splits is not None and split not in self._splits:
                yield Skip(where, "malformed-line", f"split {split!r} is not a name", None)
                continue
            yield _record_sample(
                record,
                where,
                root,
                split,
                self._labelled,
                image_fields=_IMAGE_FIELDS,
                caption_fields=_CAPTION_FIELDS,
                key_fields=_KEY_FIELDS,
                max_file_bytes=self.max_file_bytes,
            )

    def _records(self) -> Iterator[tuple[str, dict[str, Any] | Skip]]:
        return _jsonl_records(self.listing) if self.jsonl else _tsv_records(self.listing)

    def _scan(self) -> tuple[bool, tuple[str, ...] | None]:
        labelled, splits = False, set()
        for _, record in self._records():
            if isinstance(record, dict):
                labelled = labelled or record.get("label") is not None
                split = record.get("split")
                if isinstance(split, str) and split and "/" not in split:
                    splits.add(split)
        return labelled, (tuple(sorted(splits)) if splits else None)


def _is_jsonl(path: Path) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return True
    if path.suffix.lower() in (".tsv", ".txt", ".csv"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return next((line for line in f if line.strip()), "").lstrip().startswith("{")


def _tsv_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | Skip]]:
    with open(path, encoding="utf-8", errors="strict", newline="\n") as f:
        for number, raw in enumerate(_lines(f, path), start=1):
            line = raw.rstrip("\r\n")
            where = f"{path}:{number}"
            if not line.strip():
                continue
            fields = line.split("\t")
            if number == 1 and fields[0].strip().lower() in _IMAGE_FIELDS + ("filename",):
                continue  # header
            if len(fields) not in (2, 3):
                yield (
                    where,
                    Skip(where, "malformed-line", f"expected image<TAB>caption[<TAB>label], got {len(fields)} fields"),
                )
                continue
            record: dict[str, Any] = {"image": fields[0], "caption": fields[1]}
            if len(fields) == 3 and fields[2].strip():
                record["label"] = fields[2].strip()
            yield where, record


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | Skip]]:
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(_lines(f, path), start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, Skip(where, "malformed-line", f"invalid JSON: {err.msg} at column {err.colno}")
                continue
            if not isinstance(record, dict):
                yield where, Skip(where, "malformed-line", f"expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record


def _lines(handle: Any, path: Path) -> Iterator[str]:
    try:
        yield from handle
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err


def _record_sample(
    record: dict[str, Any],
    where: str,
    root: Path,
    split: str | None,
    labelled: bool,
    *,
    image_fields: Sequence[str],
    caption_fields: Sequence[str],
    key_fields: Sequence[str],
    max_file_bytes: int,
) -> Sample | Skip:
    """A sample (its image a `LocalFile` confined to `root`, which is resolved) or a malformed-line skip."""
    image = _first(record, image_fields)
    caption = _first(record, caption_fields)
    if not isinstance(image, str) or not image:
        return Skip(where, "malformed-line", f"no image path (field {' or '.join(image_fields)})", split)
    if caption is not None and not isinstance(caption, str):
        return Skip(where, "malformed-line", f"caption is not a string: {caption!r}", split)
    key = _first(record, key_fields)
    key = image if key is None else str(key)
    label = record.get("label")
    if labelled:
        if label is None:
            return Skip(where, "malformed-line", "no label, though other lines have one", split)
        try:
            label = integer_label(label)
        except ValueError:
            return Skip(where, "malformed-line", f"label {label!r} is not an integer", split)
    image_file = LocalFile(root, image, max_file_bytes, where)
    return Sample(key=key, image=image_file, caption=caption or "", label=label if labelled else None, split=split)


def _first(record: dict[str, Any], names: Sequence[str]) -> Any:
    return next((record[n] for n in names if record.get(n) is not None), None)


def integer_label(value: Any) -> int:
    """A label as an int: an integer, an integral float, or the text of one.

    Raises:
        ValueError: anything else (booleans and None included).
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _any_labelled(path: Path) -> bool:
    return any(isinstance(r, dict) and r.get("label") is not None for _, r in _jsonl_records(path))


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------------------- open


def open_source(
    paths: Sequence[str | os.PathLike[str]],
    fmt: str = "fetch",
    listing: str | None = None,
    *,
    columns: Mapping[str, str | None] | None = None,
    key_prefix: str = "none",
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Source:
    """The source for the CLI's `SOURCE... --format FMT [--listing FILE] [--image-col ...]`.

    Args:
        paths: Directories, or for `webdataset`/`parquet` shard files, directories and globs.
        fmt: One of `SOURCE_FORMATS`.
        listing: `folder` only: the TSV or JSONL listing.
        columns: `webdataset`/`parquet` only: comma-separated alternatives for `image`, `caption`,
            `label`, `key` (None keeps the format's default).
        key_prefix: `webdataset`/`parquet` only: `none` or `source`.
        max_file_bytes: image files (`hateful-memes`, `folder`) and tar members (`webdataset`) larger
            than this are skipped unread.

    Raises:
        UsageError: an unknown format, a wrong number of directories, a missing listing, or an
            option of another format.
    """
    if fmt not in SOURCE_FORMATS:
        raise UsageError(f"unknown source format {fmt!r}; valid: {', '.join(SOURCE_FORMATS)}")
    if listing is not None and fmt != "folder":
        raise UsageError(f"--listing only applies to --format folder, not {fmt!r}")
    if max_file_bytes < 1:
        raise UsageError(f"--max-image-bytes {max_file_bytes} is invalid; valid: >= 1")
    chosen = {k: v for k, v in (columns or {}).items() if v is not None}
    if fmt in ("webdataset", "parquet"):
        return _open_shard_source(paths, fmt, chosen, key_prefix, max_file_bytes)
    if chosen or key_prefix != "none":
        given = ", ".join([f"--{k}-col" for k in chosen] + (["--key-prefix"] if key_prefix != "none" else []))
        raise UsageError(f"{given} only apply to --format webdataset or parquet, not {fmt!r}")
    if fmt == "fetch":
        return FetchSource(paths)
    if len(paths) != 1:
        raise UsageError(
            f"--format {fmt} takes exactly one directory, got {len(paths)}: {', '.join(str(p) for p in paths)}"
        )
    if fmt == "hateful-memes":
        return HatefulMemesSource(paths[0], max_file_bytes=max_file_bytes)
    if listing is None:
        raise UsageError("--format folder needs --listing FILE (a TSV or JSONL of image path, caption, label)")
    return FolderSource(paths[0], listing, max_file_bytes=max_file_bytes)


def _open_shard_source(
    paths: Sequence[str | os.PathLike[str]],
    fmt: str,
    columns: Mapping[str, str],
    key_prefix: str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Source:
    # Imported here: both modules build on this one's Sample, Skip and Source.
    from vilbert.pipeline.parquet import PARQUET_COLUMNS, ParquetSource
    from vilbert.pipeline.shard_inputs import Columns
    from vilbert.pipeline.webdataset import WEBDATASET_COLUMNS, WebDatasetSource

    if fmt == "webdataset":
        return WebDatasetSource(paths, Columns.parse(WEBDATASET_COLUMNS, **columns), key_prefix, max_file_bytes)
    return ParquetSource(paths, Columns.parse(PARQUET_COLUMNS, **columns), key_prefix)


# --------------------------------------------------------------------------------------- captions

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def iter_captions(
    paths: Sequence[str | os.PathLike[str]], fmt: str = "auto", caption_col: str | None = None
) -> Iterator[str]:
    """The captions of fetch output directories, Hateful Memes directories, text files, webdataset
    tar shards and parquet files.

    A Hateful Memes directory gives its `train.jsonl` texts only (no dev/test text in a vocabulary).
    A file is JSONL (`caption` or `text` field), or lines of text: a CC TSV line
    (`caption<TAB>url`) gives its first field, a folder listing line (`image<TAB>caption...`) its
    second, any other line itself. Tar shards and parquet files (by name; a directory holding them;
    a glob pattern) give the captions preprocess would read, without reading an image.

    Args:
        paths: What to read.
        fmt: `auto` (each path by what it is), `webdataset` or `parquet` (all paths).
        caption_col: The caption field of tar shards or parquet files (comma-separated alternatives).

    Raises:
        UsageError: a path that does not exist, an unknown format.
    """
    if fmt not in ("auto", "webdataset", "parquet"):
        raise UsageError(f"unknown caption source format {fmt!r}; valid: auto, webdataset, parquet")
    for entry in paths:
        path = Path(entry)
        kind = fmt if fmt != "auto" else _shard_kind(path)
        if kind is not None:
            yield from _open_shard_source([path], kind, {"caption": caption_col}, "none").captions()
        elif path.is_dir() and (path / "train.jsonl").is_file():
            yield from _jsonl_captions(path / "train.jsonl", ("text",))
        elif path.is_dir():
            from vilbert.pipeline._fetched_rows import iter_fetched_rows

            for batch in iter_fetched_rows([path], columns=["caption"]):  # the JPEGs stay on disk
                yield from (c or "" for c in batch.column("caption").to_pylist())
        elif path.is_file() and _is_jsonl(path):
            yield from _jsonl_captions(path, _CAPTION_FIELDS)
        elif path.is_file():
            yield from _text_captions(path)
        else:
            raise UsageError(f"caption source {path} does not exist")


def _shard_kind(path: Path) -> str | None:
    """`webdataset` or `parquet` for a tar shard, a parquet file, a directory or pattern of them."""
    from vilbert.pipeline.webdataset import WEBDATASET_SUFFIXES

    name = path.name.lower()
    if name.endswith(WEBDATASET_SUFFIXES):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if path.is_dir() and not (path / "train.jsonl").is_file() and not (path / "images").is_dir():
        names = [p.name.lower() for p in path.iterdir()]
        if any(n.endswith(WEBDATASET_SUFFIXES) for n in names):
            return "webdataset"  # img2dataset's webdataset output also holds metadata parquet files
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
    return None


def _jsonl_captions(path: Path, fields: Sequence[str]) -> Iterator[str]:
    for _, record in _jsonl_records(path):
        if isinstance(record, dict) and isinstance(caption := _first(record, fields), str):
            yield caption


def _text_captions(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) > 1 and fields[0].lower().endswith(_IMAGE_SUFFIXES):
                yield fields[1]
            else:
                yield fields[0]
