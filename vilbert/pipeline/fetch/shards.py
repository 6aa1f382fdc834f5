"""The fetch output directory: its layout, schemas, and the atomic part writer.

    OUT/images/part-000042.arrow     saved rows (IMAGE_SCHEMA), sorted by line within the part
    OUT/failures/part-000042.arrow   failed lines (FAILURE_SCHEMA), sorted by line
    OUT/failures.arrow               all current failures, one row per line (rewritten per run)
    OUT/fetch-state.json             the options the output was started with (a rerun must match)
    OUT/fetch-report.json            counts by reason, bytes, duration, throughput (per run)

Parts are small (`rows_per_part` rows or `seconds_per_part` seconds, whichever comes first) and each
is written to `*.tmp`, fsynced and renamed, so after a crash or `kill -9` every part on disk is
complete and at most the rows of the unflushed buffer are lost - and fetched again by the rerun,
which treats a line as done when any complete part holds it. A line is in exactly one images part
or in failure parts only: no row is written twice, none is lost.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from vilbert.cache.format import fsync_dir

__all__ = [
    "IMAGE_SCHEMA",
    "FAILURE_SCHEMA",
    "SavedRow",
    "FailedRow",
    "PartWriter",
    "sample_key",
    "list_parts",
    "write_table_atomic",
]

IMAGE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("line", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpeg", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
    ]
)
FAILURE_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("http_status", pa.int32()),
        ("message", pa.string()),
        ("transient", pa.bool_()),
        ("attempts", pa.int32()),
        ("seconds", pa.float32()),
    ]
)
_PART = re.compile(r"^part-(\d{6,})\.arrow$")


def sample_key(line: int, url: str, caption: str) -> str:
    """`<line, 9 digits>-<8 hex of sha1(url TAB caption)>`: unique within a list, sorts by line, and
    changes if the list is edited at that line (so stale outputs are recognisable)."""
    digest = hashlib.sha1(f"{url}\t{caption}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{line:09d}-{digest}"


@dataclass(frozen=True, slots=True)
class SavedRow:
    line: int
    url: str
    caption: str
    jpeg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int


@dataclass(frozen=True, slots=True)
class FailedRow:
    line: int
    url: str
    reason: str
    http_status: int | None
    message: str
    transient: bool
    attempts: int
    seconds: float


def list_parts(out_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """Complete parts of `kind` ("images" or "failures") as (sequence number, path), in order."""
    folder = Path(out_dir) / kind
    if not folder.is_dir():
        return []
    parts = [(int(m.group(1)), folder / m.group(0)) for m in map(_PART.match, os.listdir(folder)) if m]
    return sorted(parts)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write an Arrow IPC file via `path.tmp`, fsync and rename: readers see all of it or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class PartWriter:
    """Buffers saved and failed rows and writes them out as numbered parts.

    `take()` (cheap, on the event loop) swaps the buffers out; `write(batch)` (slow, on an I/O
    thread) writes them. Sequence numbers continue after the highest part already on disk.
    """

    def __init__(self, out_dir: Path, *, rows_per_part: int = 1000, seconds_per_part: float = 10.0) -> None:
        self.out_dir = Path(out_dir)
        self.rows_per_part, self.seconds_per_part = rows_per_part, seconds_per_part
        for kind in ("images", "failures"):
            (self.out_dir / kind).mkdir(parents=True, exist_ok=True)
            for leftover in (self.out_dir / kind).glob("*.tmp"):  # from a killed run: never renamed
                leftover.unlink()
        last = [seq for kind in ("images", "failures") for seq, _ in list_parts(self.out_dir, kind)]
        self._next_seq = max(last, default=-1) + 1
        self._saved: list[SavedRow] = []
        self._failed: list[FailedRow] = []
        self._since = time.monotonic()

    def add_saved(self, row: SavedRow) -> None:
        self._saved.append(row)

    def add_failed(self, row: FailedRow) -> None:
        self._failed.append(row)

    def due(self) -> bool:
        """Whether the buffer is big or old enough to be written."""
        pending = len(self._saved) + len(self._failed)
        return pending >= self.rows_per_part or (pending and time.monotonic() - self._since >= self.seconds_per_part)

    def take(self) -> tuple[int, list[SavedRow], list[FailedRow]] | None:
        """Swap out the buffered rows with the sequence number of their part; None if empty."""
        if not self._saved and not self._failed:
            return None
        batch = (self._next_seq, self._saved, self._failed)
        self._next_seq += 1
        self._saved, self._failed, self._since = [], [], time.monotonic()
        return batch

    def write(self, batch: tuple[int, list[SavedRow], list[FailedRow]]) -> None:
        """Write one batch from `take()`: failures first, then images (each atomically)."""
        seq, saved, failed = batch
        name = f"part-{seq:06d}.arrow"
        if failed:
            write_table_atomic(_failures_table(failed), self.out_dir / "failures" / name)
        if saved:
            write_table_atomic(_images_table(saved), self.out_dir / "images" / name)


def _images_table(rows: list[SavedRow]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r.line)
    columns = {
        "key": [sample_key(r.line, r.url, r.caption) for r in rows],
        "line": [r.line for r in rows],
        "url": [r.url for r in rows],
        "caption": [r.caption for r in rows],
        "jpeg": [r.jpeg for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "orig_width": [r.orig_width for r in rows],
        "orig_height": [r.orig_height for r in rows],
    }
    return pa.Table.from_pydict(columns, schema=IMAGE_SCHEMA)


def _failures_table(rows: list[FailedRow]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r.line)
    names = FAILURE_SCHEMA.names
    return pa.Table.from_pydict({n: [getattr(r, n) for r in rows] for n in names}, schema=FAILURE_SCHEMA)
