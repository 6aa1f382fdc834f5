"""Webdataset tar shards as a preprocess source: img2dataset's `webdataset` output and the shared
CC3M/CC12M copies made with it.

A shard is a tar file; a sample is a run of consecutive members sharing a key (the member's name up
to the first dot of its base name; the rest is the field: `000000012.jpg`, `000000012.txt`,
`000000012.json`), as `webdataset` groups them. Members are read in one streaming pass
(`tar_stream`: plain, gzip, bzip2 or xz), so memory holds one sample at a time whatever the shard
size; members larger than `max_member_bytes` are never kept. Image bytes go to preprocess's decode gate untouched.

Dirty input is a counted skip naming the shard and member, never a crash: a sample without an image
(`no-image`), without a caption (`no-caption`), with an undecodable caption, label or key
(`malformed-caption`, `-label`, `-key`), two members for one field (`malformed-sample`), an
oversized member (`too-large`), and a tar that ends in the middle of a member or cannot be read
(`truncated-shard`, `unreadable-shard`: the samples before the break are kept).
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vilbert.pipeline.local_files import DEFAULT_MAX_FILE_BYTES
from vilbert.pipeline.shard_inputs import Columns, describe_shards, expand_shards, key_prefixes
from vilbert.pipeline.sources import Sample, Skip, Source, integer_label
from vilbert.pipeline.tar_stream import TarFormatError, TarMember, TarStream, open_tar_stream

__all__ = ["WEBDATASET_SUFFIXES", "WEBDATASET_COLUMNS", "MAX_MEMBER_BYTES", "TarSample", "WebDatasetSource", "iter_tar"]

log = logging.getLogger(__name__)

WEBDATASET_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WEBDATASET_COLUMNS = Columns(image=("jpg", "jpeg", "png", "webp"), caption=("txt", "json.caption"))
"""img2dataset writes `txt` when it saves captions, and always a `json` member with the caption."""
MAX_MEMBER_BYTES = DEFAULT_MAX_FILE_BYTES  # the same cap as a listing's image files
"""Four times fetch's 16 MiB response cap: no real photo is larger, and one sample's members are
held in memory at once."""
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
"""webdataset's own split of a member name into key and field (`base_plus_ext`)."""


@dataclass
class TarSample:
    """The wanted members of one sample, as read from a shard."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    """Field (lower-case extension) -> bytes, for the fields asked for."""
    names: list[str] = field(default_factory=list)
    """Every member name of the sample, in tar order (for messages)."""
    oversized: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)


class WebDatasetSource(Source):
    """Samples from webdataset tar shards, shard after shard, each in tar order.

    Args:
        paths: Tar files, directories of them, or glob patterns.
        columns: Which fields hold the image, caption, label and key (see `shard_inputs`).
        key_prefix: `none` or `source` (see `shard_inputs.KEY_PREFIXES`).
        max_member_bytes: Larger members are skipped unread.

    Raises:
        UsageError: no shard found, a shard given twice.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        columns: Columns = WEBDATASET_COLUMNS,
        key_prefix: str = "none",
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ) -> None:
        self.shards = expand_shards(paths, WEBDATASET_SUFFIXES, "tar shards")
        self.columns = columns
        self.prefixes = key_prefixes(self.shards, key_prefix, WEBDATASET_SUFFIXES)
        self.max_member_bytes = max_member_bytes
        self.description = describe_shards("webdataset", self.shards, columns, key_prefix)

    def has_labels(self, split: str) -> bool:
        return bool(self.columns.label)

    def size_hint(self) -> int | None:
        """The sample count img2dataset's `NNNNN_stats.json` files give, when every shard has one."""
        total = 0
        for shard in self.shards:
            stats = _stats_file(shard)
            try:
                total += int(json.loads(stats.read_text(encoding="utf-8"))["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return total

    def __iter__(self) -> Iterator[Sample | Skip]:
        wanted = _wanted_fields(self.columns)
        for shard in self.shards:
            for item in iter_tar(shard, wanted, self.max_member_bytes):
                yield item if isinstance(item, Skip) else self._sample(shard, item)

    def captions(self) -> Iterator[str]:
        """Every readable caption, in order, reading no image (for `vilbert tokenizer train`)."""
        text_only = Columns(image=(), caption=self.columns.caption)
        for shard in self.shards:
            for item in iter_tar(shard, _wanted_fields(text_only), self.max_member_bytes):
                if isinstance(item, TarSample):
                    try:
                        caption = _field(item, self.columns.caption, "caption", text=True)
                    except _FieldError:
                        continue  # preprocess skips it too
                    if isinstance(caption, str):
                        yield caption

    def _sample(self, shard: Path, tar: TarSample) -> Sample | Skip:
        columns, source = self.columns, str(shard)
        image_field = next((f for f in columns.image if f in tar.members or f in tar.oversized), None)
        member = f"{tar.key}.{image_field}" if image_field else ",".join(tar.names)

        def skip(reason: str, detail: str) -> Skip:
            return Skip(self.prefixes[shard] + tar.key, reason, detail, source=source, member=member)

        if tar.repeated:
            return skip("malformed-sample", f"two members for field(s) {', '.join(tar.repeated)}")
        if image_field is None:
            return skip("no-image", f"no {'/'.join(columns.image)} member among {', '.join(tar.names)}")
        if image_field in tar.oversized:
            return skip("too-large", f"member is over {self.max_member_bytes:,} bytes")
        try:
            caption = _field(tar, columns.caption, "caption", text=True)
            label = _field(tar, columns.label, "label") if columns.label else None
            key = _field(tar, columns.key, "key") if columns.key else tar.key
        except _FieldError as err:
            return skip(err.reason, str(err))
        if caption is None:
            return skip("no-caption", f"no {' or '.join(columns.caption)} among {', '.join(tar.names)}")
        if columns.label:
            try:
                label = integer_label(label)
            except ValueError:
                return skip("malformed-label", f"label {label!r} ({'/'.join(columns.label)}) is not an integer")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not key:
            return skip("malformed-key", f"key {key!r} ({'/'.join(columns.key)}) is not a non-empty string")
        return Sample(
            key=self.prefixes[shard] + key,
            image=tar.members[image_field],
            caption=caption,
            label=label,
            source=source,
            member=member,
        )


# ----------------------------------------------------------------------------------- tar reading


def iter_tar(path: Path, wanted: frozenset[str], max_member_bytes: int) -> Iterator[TarSample | Skip]:
    """The samples of one tar shard in order, with the bytes of the `wanted` fields only.

    A read error ends the shard with one `Skip` (`truncated-shard` after at least one member,
    `unreadable-shard` before any) naming the member being read; the samples before it are yielded.
    """
    current: TarSample | None = None
    name = "(the first member)"
    try:
        with open(path, "rb") as raw:
            tar = open_tar_stream(raw)
            for member in tar:
                name = member.name
                parsed = _KEY_AND_FIELD.match(name) if member.regular else None
                if parsed is None or os.path.basename(name).startswith("__"):
                    continue  # directories, names without a field, webdataset's __meta__ members
                key, field_name = parsed.group(1), parsed.group(2).lower()
                if current is not None and key != current.key:
                    yield current
                    current = None
                current = current or TarSample(key)
                _read_member(tar, member, field_name, current, wanted, max_member_bytes)
    except (TarFormatError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        started = current is not None or name != "(the first member)"
        reason = "truncated-shard" if started else "unreadable-shard"
        detail = f"the tar breaks while reading {name} ({type(err).__name__}: {err}); earlier samples are kept"
        yield Skip(f"{path}:{name}", reason, detail, source=str(path), member=name)
        return
    if current is not None:
        yield current


def _read_member(
    tar: TarStream, member: TarMember, field_name: str, sample: TarSample, wanted: frozenset[str], cap: int
) -> None:
    sample.names.append(os.path.basename(member.name))
    if field_name not in wanted:
        return  # never kept: the stream reads past it
    if field_name in sample.members or field_name in sample.oversized:
        sample.repeated.append(field_name)
    elif member.size > cap:
        sample.oversized.append(field_name)
    else:
        sample.members[field_name] = tar.read()


class _FieldError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _wanted_fields(columns: Columns) -> frozenset[str]:
    names = [*columns.image, *columns.caption, *columns.label, *columns.key]
    return frozenset("json" if n.startswith("json.") else n.lower() for n in names)


def _field(sample: TarSample, choices: Sequence[str], what: str, text: bool = False) -> Any:
    """The first of `choices` the sample has: a member's text, or a field of its `json` member.

    Raises:
        _FieldError: `malformed-<what>` for a member that is not UTF-8 or (`text`) a json value that
            is not a string; `malformed-sample` for a `json` member that is not a JSON object.
    """
    for choice in choices:
        if choice.startswith("json."):
            record = _json_member(sample)
            value = record.get(choice[5:]) if record is not None else None
            if value is None:
                continue
            if text and not isinstance(value, str):
                raise _FieldError(f"malformed-{what}", f"{choice} is {type(value).__name__}, not text: {value!r:.60}")
            return value
        if choice.lower() in sample.members:
            try:
                return sample.members[choice.lower()].decode("utf-8")
            except UnicodeDecodeError as err:
                raise _FieldError(f"malformed-{what}", f"member {sample.key}.{choice} is not UTF-8 ({err})") from err
    return None


def _json_member(sample: TarSample) -> dict[str, Any] | None:
    if "json" not in sample.members:
        return None
    try:
        record = json.loads(sample.members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _FieldError("malformed-sample", f"member {sample.key}.json is not JSON ({err})") from err
    if not isinstance(record, dict):
        raise _FieldError("malformed-sample", f"member {sample.key}.json is not a JSON object")
    return record


def _stats_file(shard: Path) -> Path:
    name = shard.name
    for suffix in WEBDATASET_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return shard.with_name(f"{name}_stats.json")
