"""The writer's side of an existing directory: refuse, overwrite, or resume an interrupted build.

Resume trusts a shard only if it is listed in `.progress.json` (or the manifest of a finished cache),
has the listed size, opens in pyarrow with the expected schema and holds a full `rows_per_shard`
rows; the first shard that fails any of these and everything after it are rebuilt. Sizes and schema
are checked, not checksums: re-hashing a 500 GB cache to resume is `vilbert cache verify`'s job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from vilbert.cache.format import (
    LEGACY_MANIFEST_NAMES,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    ShardInfo,
    fsync_dir,
    write_json_atomic,
)
from vilbert.errors import CacheError, UsageError

__all__ = ["PROGRESS_NAME", "LOCK_NAME", "prepare_directory", "lock_directory", "unlock_directory"]

log = logging.getLogger(__name__)

PROGRESS_NAME = ".progress.json"
LOCK_NAME = ".lock"
_OWN_PATTERNS = ("shard-*.arrow", ".shard-*.arrow.tmp", ".*.json.tmp")
_LEGACY_FILES = (*LEGACY_MANIFEST_NAMES, "tokenizer.json")
"""Side files of format version 1, removed by `overwrite`."""


def lock_directory(path: Path) -> int:
    """Create `path` if needed and hold an exclusive lock on it for this writer's lifetime.

    Raises:
        UsageError: another process is writing this cache.
    """
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"another process is writing the cache {path} (it holds {path / LOCK_NAME}); "
            "wait for it to finish or stop it"
        ) from None
    return fd


def unlock_directory(path: Path, fd: int) -> None:
    (path / LOCK_NAME).unlink(missing_ok=True)
    os.close(fd)


def prepare_directory(path: Path, mode: str, config: dict[str, Any], schema: pa.Schema) -> list[ShardInfo]:
    """Make `path` ready for writing; returns the completed shards kept (empty unless resuming).

    Raises:
        UsageError: `create` over an existing non-empty directory, or `overwrite` of a directory
            that does not look like a cache.
        CacheError: `resume` with settings that differ from the interrupted build.
    """
    exists = path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())
    state = _existing_state(path) if exists else None
    if not exists:
        path.mkdir(parents=True, exist_ok=True)
        return []
    if mode == "create":
        what = {
            "manifest": "a complete cache",
            "progress": "an unfinished cache build",
            "legacy": "a cache of an older format version",
        }.get(state["kind"] if state else "", "a non-empty directory")
        raise UsageError(
            f"cache directory {path} already exists ({what}); choose another path, or pass "
            "mode='overwrite' (CLI: --overwrite) to rebuild it, or mode='resume' "
            "(CLI: --resume) to continue an interrupted build"
        )
    if state is None and not _only_own_files(path):
        raise UsageError(
            f"refusing to {mode} {path}: it is not empty and does not look like a cache "
            f"(no {MANIFEST_NAME}, no {PROGRESS_NAME}, no shard-*.arrow)"
        )
    if mode == "overwrite":
        _remove_cache_files(path)
        return []
    if state is not None and state["kind"] == "legacy":
        raise CacheError(
            f"cannot resume {path}: it is a cache of an older format version; "
            "pass mode='overwrite' (--overwrite) to rebuild it"
        )
    return _resume(path, state, config, schema)


def _existing_state(path: Path) -> dict[str, Any] | None:
    for kind, name in (("manifest", MANIFEST_NAME), ("progress", PROGRESS_NAME)):
        file = path / name
        if file.is_file():
            try:
                return {"kind": kind, "data": json.loads(file.read_text(encoding="utf-8"))}
            except (OSError, json.JSONDecodeError) as err:
                raise CacheError(f"{file}: unreadable ({err}); pass mode='overwrite' to rebuild") from err
    if any((path / name).is_file() for name in LEGACY_MANIFEST_NAMES):
        return {"kind": "legacy", "data": {}}
    return None


def _only_own_files(path: Path) -> bool:
    own = {p for pattern in _OWN_PATTERNS for p in path.glob(pattern)} | {path / TOKENIZER_NAME, path / LOCK_NAME}
    own |= {path / name for name in _LEGACY_FILES}
    return all(p in own for p in path.iterdir())


def _remove_cache_files(path: Path) -> None:
    # The manifest goes first: a crash halfway must not leave a manifest naming deleted shards.
    for name in (MANIFEST_NAME, *LEGACY_MANIFEST_NAMES):
        (path / name).unlink(missing_ok=True)
    fsync_dir(path)
    for pattern in _OWN_PATTERNS:
        for file in path.glob(pattern):
            file.unlink()
    for name in (PROGRESS_NAME, TOKENIZER_NAME, *_LEGACY_FILES):
        (path / name).unlink(missing_ok=True)


def _resume(path: Path, state: dict[str, Any] | None, config: dict[str, Any], schema: pa.Schema) -> list[ShardInfo]:
    if state is None:
        _remove_cache_files(path)
        return []
    data = state["data"]
    previous = data.get("config", data) if state["kind"] == "progress" else data
    changed = sorted(k for k in config if previous.get(k) != config[k])
    if changed:
        details = "; ".join(f"{k}: was {previous.get(k)!r}, now {config[k]!r}" for k in changed)
        raise CacheError(
            f"cannot resume {path}: it was built with different settings ({details}); "
            "pass mode='overwrite' (--overwrite) to rebuild it"
        )
    kept = _valid_prefix(path, data.get("shards", []), config["rows_per_shard"], schema)
    if state["kind"] == "manifest":
        (path / MANIFEST_NAME).unlink()  # the cache is being changed: no longer complete
        fsync_dir(path)
    keep_names = {s.name for s in kept}
    for pattern in _OWN_PATTERNS:
        for file in path.glob(pattern):
            if file.name not in keep_names:
                file.unlink()
    write_json_atomic(path / PROGRESS_NAME, {"config": config, "shards": [s.__dict__ for s in kept]})
    log.info("resuming %s: keeping %d completed shards (%d rows)", path, len(kept), sum(s.rows for s in kept))
    return kept


def _valid_prefix(path: Path, listed: list[dict[str, Any]], rows_per_shard: int, schema: pa.Schema) -> list[ShardInfo]:
    kept: list[ShardInfo] = []
    for index, entry in enumerate(listed):
        shard = ShardInfo(**entry)
        problem = _shard_problem(path / shard.name, shard, rows_per_shard, schema, index)
        if problem:
            log.warning("resume %s: rebuilding from %s (%s)", path, shard.name, problem)
            break
        kept.append(shard)
    return kept


def _shard_problem(file: Path, shard: ShardInfo, rows_per_shard: int, schema: pa.Schema, index: int) -> str | None:
    if shard.name != f"shard-{index:05d}.arrow":
        return f"unexpected name at position {index}"
    if shard.rows != rows_per_shard:
        return f"partial shard ({shard.rows} of {rows_per_shard} rows)"
    if not file.is_file() or file.stat().st_size != shard.bytes:
        return "missing or wrong size"
    try:
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_file(source)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            same = reader.schema.equals(schema, check_metadata=True)
    except (OSError, pa.ArrowInvalid) as err:
        return f"unreadable ({err})"
    if not same or rows != shard.rows:
        return "schema or row count differs"
    return None
