"""Fetch output rows in `iter_fetched`'s order, with resident memory that does not grow.

`vilbert.pipeline.fetch.iter_fetched` keeps every image part memory-mapped for the whole pass, so
every page it has read stays resident: its RSS grows with the fetch output, by about the size of the
JPEGs (20,000 images: +450 MB; CC3M: tens of GB of page cache counted as the reader's). Preprocess
reads the same rows in the same order (by source line, then by output in the order given; tested
against `iter_fetched`), but keeps a part mapped only while a batch of its rows is in use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from vilbert.cache.format import arrow_array, numpy_column
from vilbert.errors import DataError
from vilbert.pipeline.fetch import IMAGE_SCHEMA
from vilbert.pipeline.fetch.shards import list_parts

__all__ = ["iter_fetched_rows"]


def iter_fetched_rows(
    dirs: Sequence[Path], batch_size: int = 256, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The saved rows of fetch outputs `dirs` as RecordBatches of `IMAGE_SCHEMA` (or its `columns`),
    in line order."""
    paths, index = _line_index(dirs)
    if not paths:
        return
    order = np.lexsort((index[:, 1], index[:, 0]))  # by line, then by output
    for start in range(0, len(order), batch_size):
        picked = index[order[start : start + batch_size]]
        yield _take(paths, picked[:, 2], picked[:, 3], columns)


def _line_index(dirs: Sequence[Path]) -> tuple[list[Path], np.ndarray]:
    """Every saved row as (line, output, part, row); reads only the `line` column of each part."""
    paths: list[Path] = []
    index: list[np.ndarray] = []
    for d_index, directory in enumerate(dirs):
        for _, path in list_parts(Path(directory), "images"):
            with pa.memory_map(str(path)) as source:
                reader = _open(source, path)
                lines = np.concatenate(
                    [numpy_column(reader.get_batch(i).column("line")) for i in range(reader.num_record_batches)]
                    or [np.zeros(0, np.int64)]
                )
            n = len(lines)
            index.append(np.stack([lines, np.full(n, d_index), np.full(n, len(paths)), np.arange(n)], axis=1))
            paths.append(path)
    return paths, (np.concatenate(index) if index else np.zeros((0, 4), np.int64))


def _open(source: pa.NativeFile, path: Path) -> pa.ipc.RecordBatchFileReader:
    try:
        reader = pa.ipc.open_file(source)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path} is not a readable Arrow IPC file ({err}); delete it and rerun the fetch") from err
    if reader.schema != IMAGE_SCHEMA:
        raise DataError(f"{path}: unexpected columns {reader.schema.names}; expected {IMAGE_SCHEMA.names}")
    return reader


def _take(paths: list[Path], parts: np.ndarray, rows: np.ndarray, columns: list[str] | None = None) -> pa.RecordBatch:
    """Rows (parts[i], rows[i]) in the given order (all columns, or `columns`), out of mappings closed
    right after: consecutive rows (a part's rows in line order, as fetch writes them) as a slice,
    which keeps only its part's mapping alive, and only while the batch lives; others copied."""
    pieces, positions = [], []
    for part in np.unique(parts):
        mask = parts == part
        picked = rows[mask]
        with pa.memory_map(str(paths[part])) as source:
            table = _open(source, paths[part]).read_all()
            if columns is not None:
                table = table.select(columns)
            if np.array_equal(picked, np.arange(picked[0], picked[0] + len(picked))):
                pieces.append(table.slice(int(picked[0]), len(picked)).combine_chunks())  # no copy: a view
            else:
                pieces.append(table.take(arrow_array(picked)).combine_chunks())  # a copy
            del table
        positions.append(np.nonzero(mask)[0])
    merged = pa.concat_tables(pieces)
    order = np.concatenate(positions)
    if np.array_equal(order, np.arange(len(parts))):  # parts follow each other in line order: no reorder
        return merged.combine_chunks().to_batches()[0]
    inverse = np.empty(len(parts), dtype=np.int64)
    inverse[order] = np.arange(len(parts))
    return merged.take(arrow_array(inverse)).combine_chunks().to_batches()[0]
