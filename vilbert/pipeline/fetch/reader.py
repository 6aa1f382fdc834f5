"""Reading fetch outputs: saved rows in line order (for preprocess), current failures, resume state.

The reader never imports the writer's machinery beyond the layout (`shards.list_parts`, schemas).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from vilbert.cache.format import numpy_column
from vilbert.errors import FetchError
from vilbert.pipeline.fetch.shards import FAILURE_SCHEMA, IMAGE_SCHEMA, list_parts

__all__ = ["iter_fetched", "read_failures", "count_fetched", "LineSet", "done_lines"]


def _open(path: Path) -> pa.Table:
    """Memory-map one complete Arrow IPC part (zero-copy: JPEG bytes are paged in as read)."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise FetchError(f"{path} is not a readable Arrow IPC file ({err}); delete it and rerun the fetch") from err


def _as_dirs(out_dirs: str | Path | Sequence[str | Path]) -> list[Path]:
    dirs = [Path(out_dirs)] if isinstance(out_dirs, (str, Path)) else [Path(d) for d in out_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FetchError(f"fetch output {d} does not exist; run `vilbert fetch cc --out {d}` first")
    return dirs


def iter_fetched(out_dirs: str | Path | Sequence[str | Path], *, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """The saved rows of one or several fetch outputs, in source line order.

    Args:
        out_dirs: A fetch output directory, or several (e.g. the `--num-shards` outputs of one
            list: their lines are disjoint, so the merged order is the list's order; ties between
            outputs of different lists go by the order given).
        batch_size: Rows per yielded batch.

    Yields:
        RecordBatches with `IMAGE_SCHEMA` columns: key, line, url, caption, jpeg, width, height,
        orig_width, orig_height. The order depends only on which rows are saved, never on how the
        download went (timing, crashes, resumes).
    """
    paths, lines, sources = [], [], []
    for d_index, out_dir in enumerate(_as_dirs(out_dirs)):
        for _, path in list_parts(out_dir, "images"):
            table = _open(path)
            if table.schema != IMAGE_SCHEMA:
                raise FetchError(f"{path}: unexpected columns {table.schema.names}; expected {IMAGE_SCHEMA.names}")
            part = len(paths)
            paths.append(path)
            lines.append(numpy_column(table.column("line")).copy())  # a copy: the part is unmapped when closed
            sources.append(
                np.stack([np.full(len(table), d_index), np.full(len(table), part), np.arange(len(table))], axis=1)
            )
            del table
    if not paths:
        return
    all_lines, all_sources = np.concatenate(lines), np.concatenate(sources)
    order = np.lexsort((all_sources[:, 0], all_lines))  # by line, then by output
    parts = _OpenParts(paths)
    for start in range(0, len(order), batch_size):
        picked = all_sources[order[start : start + batch_size]]
        yield _gather(parts, picked[:, 1], picked[:, 2])


class _OpenParts:
    """The few parts the current batches read, memory-mapped; older ones are closed (unmapped), so
    reading a whole output keeps resident memory bounded whatever its size."""

    def __init__(self, paths: list[Path], keep: int = 8) -> None:
        self.paths, self.keep = paths, keep
        self.open: dict[int, pa.Table] = {}

    def __getitem__(self, part: int) -> pa.Table:
        table = self.open.pop(part, None)
        if table is None:
            table = _open(self.paths[part])
        self.open[part] = table  # most recently used last
        while len(self.open) > self.keep:
            del self.open[next(iter(self.open))]
        return table


def _gather(tables: _OpenParts, parts: np.ndarray, rows: np.ndarray) -> pa.RecordBatch:
    """Rows (parts[i], rows[i]) in the given order, as one RecordBatch (copied out of the parts)."""
    pieces, positions = [], []
    for part in np.unique(parts):
        mask = parts == part
        pieces.append(tables[int(part)].take(pa.array(rows[mask])))
        positions.append(np.nonzero(mask)[0])
    merged = pa.concat_tables(pieces)
    inverse = np.empty(len(parts), dtype=np.int64)
    inverse[np.concatenate(positions)] = np.arange(len(parts))
    return merged.take(pa.array(inverse)).combine_chunks().to_batches()[0]


def count_fetched(out_dir: str | Path) -> int:
    """Rows saved in an output's complete image parts."""
    return sum(_open(path).num_rows for _, path in list_parts(Path(out_dir), "images"))


def _latest_failures(out_dir: Path) -> pa.Table:
    parts = [_open(path) for _, path in list_parts(out_dir, "failures")]
    if not parts:
        return FAILURE_SCHEMA.empty_table()
    table = pa.concat_tables(parts)
    lines = numpy_column(table.column("line"))
    # Parts are in write order, so the last record of a line is its latest.
    _, last_reversed = np.unique(lines[::-1], return_index=True)
    return table.take(pa.array(len(lines) - 1 - last_reversed))


def _saved_lines(out_dir: Path) -> np.ndarray:
    parts = [numpy_column(_open(path).column("line")) for _, path in list_parts(out_dir, "images")]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def read_failures(out_dir: str | Path) -> pa.Table:
    """The current failures of an output: the latest record of each line not saved since, by line."""
    out_dir = _as_dirs(out_dir)[0]
    latest = _latest_failures(out_dir)
    if latest.num_rows == 0:
        return latest
    keep = ~np.isin(numpy_column(latest.column("line")), _saved_lines(out_dir))
    return latest.filter(pa.array(keep)).sort_by("line")


class LineSet:
    """A growable bitmap of line numbers (1 bit per line: 12 MB for a 100M-line list)."""

    def __init__(self, lines: np.ndarray | None = None) -> None:
        self._bits = np.zeros(0, np.uint8)
        self.count = 0
        if lines is not None:
            self.add_many(lines)

    def add_many(self, lines: np.ndarray) -> None:
        lines = np.unique(np.asarray(lines, dtype=np.int64))
        if not len(lines):
            return
        needed = int(lines[-1]) // 8 + 1
        if needed > len(self._bits):
            self._bits = np.concatenate([self._bits, np.zeros(needed - len(self._bits), np.uint8)])
        new = ~self._contains_many(lines)
        self.count += int(new.sum())
        np.bitwise_or.at(self._bits, lines >> 3, (1 << (lines & 7)).astype(np.uint8))

    def _contains_many(self, lines: np.ndarray) -> np.ndarray:
        inside = (lines >> 3) < len(self._bits)
        out = np.zeros(len(lines), bool)
        idx = lines[inside]
        out[inside] = (self._bits[idx >> 3] >> (idx & 7)) & 1 == 1
        return out

    def __contains__(self, line: int) -> bool:
        byte = line >> 3
        return byte < len(self._bits) and bool(self._bits[byte] >> (line & 7) & 1)

    def __len__(self) -> int:
        return self.count


def done_lines(out_dir: str | Path, *, retry_failed: bool = False) -> LineSet:
    """Lines a rerun must skip: saved ones, and failed ones whose latest failure is permanent
    (unless `retry_failed`). Lines whose latest failure is transient are fetched again."""
    out_dir = Path(out_dir)
    done = LineSet(_saved_lines(out_dir))
    if not retry_failed:
        latest = _latest_failures(out_dir)
        permanent = ~numpy_column(latest.column("transient"))
        done.add_many(numpy_column(latest.column("line"))[permanent])
    return done
