"""Check a cache in full: manifest, tokenizer, and every shard's checksum, schema and contents.

Unlike opening a `CacheReader` (sizes and schemas only), this reads every byte: checksums, schema,
the range of every value (`checks.first_bad_row`, as the reader checks each batch) and unique keys.
It reports problems rather than raising, so a caller can show all of them;
`VerifyReport.raise_if_bad()` turns the first into a `CacheError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from vilbert.cache.checks import first_bad_row
from vilbert.cache.format import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    ShardInfo,
    checksum_algorithm,
    file_checksum,
    numpy_column,
    read_manifest,
    sha256_file,
)
from vilbert.errors import CacheError

__all__ = ["VerifyReport", "verify_cache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What `verify_cache` found."""

    path: Path
    manifest: Manifest | None
    shards_checked: int
    rows: int
    bytes: int
    problems: tuple[str, ...] = field(default_factory=tuple)
    """`"<shard or file>: <what is wrong>"`, in shard order; empty when the cache is sound."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_bad(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise CacheError(f"cache {self.path} is corrupt: {self.problems[0]}{more}")


def verify_cache(
    path: str | os.PathLike[str], progress: Callable[[dict[str, Any]], None] | None = None
) -> VerifyReport:
    """Verify every byte of the cache at `path`.

    Args:
        path: The cache directory.
        progress: Called after each shard with `{"shard", "done", "total", "bytes", "total_bytes"}`.

    Returns:
        A report; `report.ok` is False and `report.problems[0]` names the first bad shard if any.

    Raises:
        CacheError: not a cache at all (no manifest, unreadable manifest, unknown version).
    """
    path = Path(path)
    manifest = read_manifest(path)
    problems = _manifest_problems(path, manifest)
    schema = manifest.schema()
    keys: set[str] = set()
    done_bytes, total_bytes = 0, sum(s.bytes for s in manifest.shards)
    for number, shard in enumerate(manifest.shards):
        problem = _check_shard(path / shard.name, shard, manifest, schema, keys)
        if problem:
            problems.append(f"{shard.name}: {problem}")
            log.debug("verify %s: %s: %s", path, shard.name, problem)
        done_bytes += shard.bytes
        if progress:
            progress(
                {
                    "shard": shard.name,
                    "done": number + 1,
                    "total": len(manifest.shards),
                    "bytes": done_bytes,
                    "total_bytes": total_bytes,
                }
            )
    return VerifyReport(
        path=path,
        manifest=manifest,
        shards_checked=len(manifest.shards),
        rows=manifest.num_rows,
        bytes=done_bytes,
        problems=tuple(problems),
    )


def _manifest_problems(path: Path, manifest: Manifest) -> list[str]:
    problems = []
    tokenizer = path / TOKENIZER_NAME
    if not tokenizer.is_file():
        problems.append(f"{TOKENIZER_NAME}: missing")
    elif (digest := sha256_file(tokenizer)) != manifest.tokenizer_fingerprint:
        problems.append(
            f"{TOKENIZER_NAME}: fingerprint {digest} differs from the manifest's {manifest.tokenizer_fingerprint}"
        )
    listed = sum(s.rows for s in manifest.shards)
    if listed != manifest.num_rows:
        problems.append(f"{MANIFEST_NAME}: shard rows add up to {listed}, not num_rows={manifest.num_rows}")
    return problems


def _check_shard(file: Path, shard: ShardInfo, manifest: Manifest, schema: pa.Schema, keys: set[str]) -> str | None:
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    if size != shard.bytes:
        return f"{'truncated' if size < shard.bytes else 'wrong size'}: {size} bytes, manifest says {shard.bytes}"
    try:
        algorithm = checksum_algorithm(shard.checksum)
        digest = file_checksum(file, algorithm)
    except CacheError as err:  # an unknown algorithm, or xxh3_128 without the xxhash package
        return str(err)
    if digest != shard.checksum:
        start = len(algorithm) + 1
        return (f"checksum mismatch ({algorithm} {digest[start : start + 16]}..., "
                f"manifest says {shard.checksum[start : start + 16]}...)")  # fmt: skip
    try:
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_file(source)
            if not reader.schema.equals(schema, check_metadata=True):
                return f"schema differs from the manifest's: {reader.schema.remove_metadata()}"
            if reader.num_record_batches != 1:
                return f"{reader.num_record_batches} record batches, expected 1"
            return _check_contents(reader.get_batch(0), shard, manifest, keys)
    except (OSError, pa.ArrowInvalid) as err:
        return f"unreadable Arrow IPC file ({err})"


def _check_contents(batch: pa.RecordBatch, shard: ShardInfo, manifest: Manifest, keys: set[str]) -> str | None:
    if batch.num_rows != shard.rows:
        return f"{batch.num_rows} rows, manifest says {shard.rows}"
    batch.validate(full=True)
    if batch.num_rows == 0:
        return None
    n = batch.num_rows
    columns = {name: numpy_column(batch.column(name)) for name in ("num_tokens", "label") if name in batch.schema.names}
    for name in ("input_ids", "pixels"):
        columns[name] = numpy_column(batch.column(name)).reshape(n, -1)
    bad = first_bad_row(columns, manifest.vocab_size, manifest.max_len)
    if bad is not None:
        return f"row {bad[0]}: {bad[1]}"
    shard_keys = batch.column("key").to_pylist()
    duplicates = keys.intersection(shard_keys) or (len(set(shard_keys)) != len(shard_keys))
    if duplicates:
        example = next(iter(duplicates)) if isinstance(duplicates, set) else _first_repeat(shard_keys)
        return f"duplicate key {example!r}"
    keys.update(shard_keys)
    return None


def _first_repeat(values: list[str]) -> str:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return ""
