"""Preprocess's side effects beside the caches: the resume log, stale caches, the writer thread."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from vilbert.cache import MANIFEST_NAME, TOKENIZER_NAME
from vilbert.cache.format import write_bytes_atomic
from vilbert.errors import DataError, UsageError

__all__ = ["REPORT_NAME", "SKIPS_NAME", "SkipLog", "BackgroundWriter", "remove_stale_caches"]

log = logging.getLogger(__name__)

REPORT_NAME = "preprocess-report.json"
SKIPS_NAME = "preprocess-skips.jsonl"


class SkipLog:
    """`OUT/preprocess-skips.jsonl`: the run's identity, then one line per image the workers skipped.

    Resuming needs it: a completed shard holds the first `rows_done` *rows* of a split, and which
    samples became rows depends on which images failed to decode; the log says so without decoding
    the prefix again. So `sync()` makes every line appended so far durable (fsync) and is called
    before the rows that follow those skips are handed to the cache writer: a committed shard's skips
    are always on disk. The header is written atomically; a torn last line (a crash mid-append) is
    cut off atomically on resume; an empty or corrupt log is one `DataError` naming the file.
    """

    def __init__(self, out: Path, run_id: str, mode: str) -> None:
        self.path = out / SKIPS_NAME
        self.skipped: dict[tuple[str, int], tuple[str, str]] = {}
        if out.exists() and not out.is_dir():
            raise UsageError(f"output {out} is a file; pass a directory to hold one cache per split")
        if mode == "create" and out.exists() and any(out.iterdir()):
            raise UsageError(
                f"output directory {out} is not empty; pass --overwrite to rebuild it or --resume "
                "to continue an interrupted run"
            )
        out.mkdir(parents=True, exist_ok=True)
        if mode == "resume" and self.path.is_file():
            self._load(run_id)
        elif mode == "resume" and any(p.is_dir() for p in out.iterdir()):
            raise UsageError(f"cannot resume into {out}: {self.path.name} is missing; pass --overwrite")
        else:
            (out / REPORT_NAME).unlink(missing_ok=True)
            write_bytes_atomic(self.path, (json.dumps({"run": run_id}) + "\n").encode("utf-8"))
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._unsynced = False

    def _load(self, run_id: str) -> None:
        data = self.path.read_bytes()
        complete, torn = data[: data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1 :]
        lines = complete.decode("utf-8", errors="replace").split("\n")[:-1]
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or "run" not in header:
            raise DataError(
                f"{self.path} is empty or corrupt (no run header), so the completed shards cannot be matched "
                "to their samples; pass --overwrite to rebuild"
            )
        if header["run"] != run_id:
            raise UsageError(
                f"cannot resume into {self.path.parent}: it was built from other inputs or options; "
                "pass --overwrite to rebuild it, or the same sources and options"
            )
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
                self.skipped[(entry["split"], entry["ordinal"])] = (entry["reason"], entry["detail"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{self.path}:{number} is corrupt ({err}); pass --overwrite to rebuild") from err
        if torn:  # a crash mid-append: the line never described a committed shard
            write_bytes_atomic(self.path, complete)

    def append(self, split: str, ordinal: int, key: str, reason: str, detail: str) -> None:
        if (split, ordinal) in self.skipped:
            return
        self.skipped[(split, ordinal)] = (reason, detail)
        entry = {"split": split, "ordinal": ordinal, "key": key, "reason": reason, "detail": detail}
        self._file.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self._unsynced = True

    def sync(self) -> None:
        """Make every appended line durable (a no-op when nothing was appended since the last call)."""
        if self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._unsynced = False

    def close(self) -> None:
        self.sync()
        self._file.close()


class BackgroundWriter:
    """Runs the cache writes on one thread, in submission order, while this thread reads, plans,
    submits and tokenizes: the writes (copy, file write, checksum, fsync) mostly release the GIL.

    Args:
        max_queued: Jobs waiting at most before `submit` blocks. Preprocess queues as many as the
            pool has slots: each job holds a slot, so the slots bound the memory, and a writer
            waiting for the disk (a shard's direct write) never stops the decoding while slots last.
    """

    def __init__(self, max_queued: int = 2) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], Callable[[], None]] | None] = queue.Queue(max_queued)
        self._thread = threading.Thread(target=self._run, name="preprocess-writer", daemon=True)
        self._error: BaseException | None = None
        self._stop = False

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def submit(self, job: Callable[[], None], done: Callable[[], None]) -> None:
        """Run `job`, then `done` (always, even after a failure)."""
        self.check()
        self._jobs.put((job, done))

    def check(self) -> None:
        """Raise the error a job raised, if any."""
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                if self._error is None and not self._stop:
                    job()
            except BaseException as err:  # handed to the submitting thread
                self._error = err
            finally:
                done()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop = exc_type is not None  # the run failed: skip the queued writes
        self._jobs.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


_CACHE_FILES = (MANIFEST_NAME, ".progress.json", TOKENIZER_NAME)


def remove_stale_caches(out: Path, keep: set[str]) -> None:
    """After an overwrite: caches of splits this run did not produce would look current; remove them."""
    for directory in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in keep):
        names = {p.name for p in directory.iterdir()}
        own = all(n in _CACHE_FILES or n.startswith(("shard-", ".shard-")) for n in names)
        if own and names & {MANIFEST_NAME, ".progress.json"}:
            shutil.rmtree(directory)
            log.info("removed %s: a cache of an earlier run, for a split this run did not produce", directory)
